"""Operators that combine their inputs: the broadcasting binary operators, Sum, Mean, Min,
Max, Pow and Where, and the products MatMul, Gemm and Einsum."""

from __future__ import annotations

import onnx
from onnx import helper

from segattr_onnx.graph.backward import GradientBuilder
from segattr_onnx.graph.gradient_rules._common import _text, _unsupported, rule


@rule("Add", "Sub", "Mul", "Div")
def _binary(b, node, dys, needs):
    first, second = node.input[0], node.input[1]
    y, dy = node.output[0], dys[0]
    grads: dict[str, str] = {}
    if first in needs:
        if node.op_type in ("Add", "Sub"):
            local = dy
        elif node.op_type == "Mul":
            local = b.op("Mul", [dy, second])
        else:
            local = b.op("Div", [dy, second])
        grads[first] = b.unbroadcast(local, first, y)
    if second in needs:
        if node.op_type == "Add":
            local = dy
        elif node.op_type == "Sub":
            local = b.op("Neg", [dy])
        elif node.op_type == "Mul":
            local = b.op("Mul", [dy, first])
        else:  # d(a/b)/db = −a/b² = −y/b
            local = b.op("Neg", [b.op("Div", [b.op("Mul", [dy, y]), second])])
        if first == second and first in grads:
            grads[first] = b.op("Add", [grads[first], b.unbroadcast(local, second, y)])
        else:
            grads[second] = b.unbroadcast(local, second, y)
    return grads


@rule("Sum")
def _sum(b, node, dys, needs):
    return {name: b.unbroadcast(dys[0], name, node.output[0]) for name in node.input if name}


@rule("MatMul")
def _matmul(b, node, dys, needs):
    first, second = node.input[0], node.input[1]
    if b.rank(first) < 2 or b.rank(second) < 2:
        return _matmul_vector(b, node, dys[0], needs)
    y, dy = node.output[0], dys[0]

    def swap_last(name: str) -> str:
        rank = b.rank(name)
        perm = [*range(rank - 2), rank - 1, rank - 2]
        return b.op("Transpose", [name], perm=perm)

    grads = {}
    if first in needs:
        grads[first] = b.unbroadcast(b.op("MatMul", [dy, swap_last(second)]), first, y)
    if second in needs:
        grads[second] = b.unbroadcast(b.op("MatMul", [swap_last(first), dy]), second, y)
    return grads


def _matmul_vector(b: GradientBuilder, node: onnx.NodeProto, dy: str, needs: set[str]):
    """MatMul with a 1-D operand, whose axis numpy-style promotion adds and then removes."""
    first, second = node.input[0], node.input[1]
    rank_a, rank_b, rank_y = b.rank(first), b.rank(second), b.rank(node.output[0])
    grads = {}
    if rank_a == 1 and rank_b == 1:  # a dot product
        pairs = ((first, second), (second, first))
        return {name: b.op("Mul", [dy, other]) for name, other in pairs if name in needs}
    if rank_a == 1:  # (k) @ (..., k, n) → (..., n)
        if first in needs:
            column = b.op("MatMul", [second, b.unsqueeze(dy, [rank_y])])  # (..., k, 1)
            grads[first] = b.reduce("ReduceSum", column, [*range(rank_b - 2), rank_b - 1], 0)
        if second in needs:
            grads[second] = b.op("Mul", [b.unsqueeze(first, [1]), b.unsqueeze(dy, [rank_y - 1])])
        return grads
    # (..., m, k) @ (k) → (..., m)
    if first in needs:
        grads[first] = b.op("Mul", [b.unsqueeze(dy, [rank_y]), second])
    if second in needs:
        row = b.op("MatMul", [b.unsqueeze(dy, [rank_y - 1]), first])  # (..., 1, k)
        grads[second] = b.reduce("ReduceSum", row, range(rank_a - 1), keepdims=0)
    return grads


@rule("Gemm")
def _gemm(b, node, dys, needs):
    a, w = node.input[0], node.input[1]
    alpha, beta = b.attribute(node, "alpha", 1.0), b.attribute(node, "beta", 1.0)
    trans_a, trans_b = b.attribute(node, "transA", 0), b.attribute(node, "transB", 0)
    dy = dys[0]
    grads = {}
    if a in needs:
        # Y = α·A'·B' (+ β·C): dA' = α·dY·B'ᵀ; dA = dA' or its transpose.
        product = b.op("Gemm", [dy, w], transB=0 if trans_b else 1, alpha=alpha)
        grads[a] = b.op("Transpose", [product], perm=[1, 0]) if trans_a else product
    if w in needs:
        product = b.op("Gemm", [a, dy], transA=0 if trans_a else 1, alpha=alpha)
        grads[w] = b.op("Transpose", [product], perm=[1, 0]) if trans_b else product
    if len(node.input) > 2 and node.input[2] in needs:
        scaled = b.op("Mul", [dy, b.scalar(beta, node.output[0])])
        grads[node.input[2]] = b.unbroadcast(scaled, node.input[2], node.output[0])
    return grads


def _elem_type_of(b: GradientBuilder, name: str) -> int:
    value = b.constant_value(name)
    if value is not None:
        return helper.np_dtype_to_tensor_dtype(value.dtype)
    return b.elem_type(name)


@rule("Pow")
def _pow(b, node, dys, needs):
    """y = aᵇ: da = dy·b·aᵇ⁻¹; db = dy·y·ln a, taken as 0 where a ≤ 0 (no real logarithm)."""
    base, exponent = node.input[0], node.input[1]
    y, dy = node.output[0], dys[0]
    base_type, exponent_type = b.elem_type(base), _elem_type_of(b, exponent)
    grads = {}
    if base in needs:
        power = exponent
        if exponent_type != base_type:  # integer (or other float) exponents, opset 12+
            power = b.op("Cast", [exponent], to=base_type)
        lowered = b.op("Pow", [base, b.op("Sub", [power, b.scalar(1, base)])])
        grads[base] = b.unbroadcast(b.op("Mul", [dy, b.op("Mul", [power, lowered])]), base, y)
    if exponent in needs:
        positive = b.op("Greater", [base, b.scalar(0, base)])
        log = b.op("Log", [b.op("Where", [positive, base, b.scalar(1, base)])])
        local = b.op("Mul", [dy, b.op("Mul", [y, log])])
        if exponent_type != base_type:
            local = b.op("Cast", [local], to=exponent_type)
        grads[exponent] = b.unbroadcast(local, exponent, y)
    return grads


@rule("Where")
def _where(b, node, dys, needs):
    """X where the condition holds, Y elsewhere; the boolean condition gets nothing."""
    condition, first, second = node.input[0], node.input[1], node.input[2]
    y, dy = node.output[0], dys[0]
    zero = b.scalar(0, y)
    grads = {}
    if first in needs:
        grads[first] = b.unbroadcast(b.op("Where", [condition, dy, zero]), first, y)
    if second in needs:
        grads[second] = b.unbroadcast(b.op("Where", [condition, zero, dy]), second, y)
    return grads


@rule("Max", "Min")
def _min_max(b, node, dys, needs):
    """Each input gets the gradient where it is the result. On ties the first such input takes
    all of it (torch splits maximum/minimum ties evenly): the inputs' gradients still sum to dy."""
    y, dy = node.output[0], dys[0]
    zero = b.scalar(0, y)
    grads, taken = {}, None
    for name in node.input:
        if not name:
            continue
        hits = b.op("Equal", [name, y])
        own = hits if taken is None else b.op("And", [hits, b.op("Not", [taken])])
        taken = hits if taken is None else b.op("Or", [taken, hits])
        if name in needs:
            grads[name] = b.unbroadcast(b.op("Where", [own, dy, zero]), name, y)
    return grads


@rule("Mean")
def _mean(b, node, dys, needs):
    inputs = [name for name in node.input if name]
    share = b.op("Mul", [dys[0], b.scalar(1.0 / len(inputs), node.output[0])])
    return {name: b.unbroadcast(share, name, node.output[0]) for name in inputs if name in needs}


@rule("Einsum")
def _einsum(b, node, dys, needs):
    """d operand k = Einsum(dY, the other operands → k's letters). Letters only operand k has
    (summed in the forward) are missing from that product: it is broadcast back along them."""
    equation = _text(b, node, "equation", "").replace(" ", "")
    if "..." in equation:
        raise _unsupported(node, f"an ellipsis in equation {equation!r}")
    inputs, _, output = equation.partition("->")
    terms = inputs.split(",")
    if "->" not in equation:  # implicit output: the letters used once, alphabetically
        letters = "".join(terms)
        output = "".join(sorted(c for c in set(letters) if letters.count(c) == 1))
    if any(len(set(term)) != len(term) for term in terms):
        raise _unsupported(node, f"a letter repeated within one operand of {equation!r}")
    sizes: dict[str, set] = {}
    for term, name in zip(terms, node.input, strict=True):
        for letter, size in zip(term, b.shape(name), strict=True):
            sizes.setdefault(letter, set()).add(size)
    if any(len(found) > 1 for found in sizes.values()):
        raise _unsupported(node, f"a letter with different sizes (broadcast) in {equation!r}")
    grads = {}
    for k, name in enumerate(node.input):
        if name not in needs:
            continue
        others = [j for j in range(len(terms)) if j != k]
        available = set(output).union(*(terms[j] for j in others))
        kept = "".join(c for c in terms[k] if c in available)
        backward = ",".join([output, *(terms[j] for j in others)]) + "->" + kept
        gradient = b.op("Einsum", [dys[0], *(node.input[j] for j in others)], equation=backward)
        missing = [i for i, c in enumerate(terms[k]) if c not in available]
        if missing:
            gradient = b.op("Expand", [b.unsqueeze(gradient, missing), b.shape_of(name)])
        grads[name] = gradient
    return grads
