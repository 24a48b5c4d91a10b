"""Session settings that decide what a rewritten graph computes."""

from __future__ import annotations

from segattr_onnx.runtime import sessions
from segattr_onnx.runtime.sessions import create_session
from tests.conftest import assert_close, fixture, run_reference


def test_a_qdq_model_computes_what_the_onnx_spec_says_on_any_cpu() -> None:
    """Q/DQ pairs are not fused into ORT's integer kernels, which saturate on CPUs without
    VNNI: every graph cut from the model then computes the same arithmetic as the model run
    with no optimisation at all (on an AVX2-only EPYC the fused logits were 11 % off)."""
    qdq = fixture("unet2d_qdq")
    model = qdq.load_with_weights()
    feeds = {model.graph.input[0].name: qdq.input(seed=3)}
    session = create_session(model, "cpu")
    assert (
        session.get_session_options().get_session_config_entry(sessions.QDQ_AS_SPECIFIED[0])
        == (sessions.QDQ_AS_SPECIFIED[1])
    )
    (plain,) = run_reference(model, feeds, qdq.path.parent)[:1]
    (ours,) = session.run(None, feeds)[:1]
    assert_close(ours, plain, 1e-5, "QDQ logits")
