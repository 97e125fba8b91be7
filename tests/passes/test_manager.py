"""PassManager (order, IR dumps, verifier after each pass, --verify numerics) and pipelines."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from pass_harness import VOCAB, canonical, random_weights, weight_fn

from kiln.errors import VerifyError
from kiln.ir import Graph, parse_graph, print_graph, verify
from kiln.passes import PASSES, Pass, PassManager, get_pass, pipeline, resolve_pipeline
from kiln.passes.base import make
from kiln.passes.differential import check_equivalent

# A traced-looking decoder layer: [1, T] inputs, separate q/k/v and gate/up projections, a
# duplicated value (cse), a dead value (dce), an LM head with soft-capping.
LM = """graph {
  %input_ids = input : i64[1,T]
  %position_ids = input : i64[1,T]
  %cu_seqlens = input : i32[S+1]
  @model.embed_tokens.weight = param : f32[16,8]
  %0 = embedding(@model.embed_tokens.weight, %input_ids) : f32[1,T,8]
  @model.layers.0.input_layernorm.weight = param : f32[8]
  %1 = rms_norm(%0, @model.layers.0.input_layernorm.weight) {"normalized_shape": [8], "eps": 1e-06} : f32[1,T,8]
  @model.layers.0.self_attn.q_proj.weight = param : f32[8,8]
  %2 = linear(%1, @model.layers.0.self_attn.q_proj.weight) : f32[1,T,8]
  %3 = reshape(%2) {"shape": [1, "T", 4, 2]} : f32[1,T,4,2]
  %4 = cast(%position_ids) {"dtype": "float32"} : f32[1,T]
  %5 = reshape(%4) {"shape": [1, "T", 1, 1]} : f32[1,T,1,1]
  %6 = cos(%5) : f32[1,T,1,1]
  %7 = mul(%3, %6) : f32[1,T,4,2]
  @model.layers.0.self_attn.k_proj.weight = param : f32[4,8]
  %8 = linear(%1, @model.layers.0.self_attn.k_proj.weight) : f32[1,T,4]
  %9 = reshape(%8) {"shape": [1, "T", 2, 2]} : f32[1,T,2,2]
  %10 = cos(%5) : f32[1,T,1,1]
  %11 = mul(%9, %10) : f32[1,T,2,2]
  @model.layers.0.self_attn.v_proj.weight = param : f32[4,8]
  %12 = linear(%1, @model.layers.0.self_attn.v_proj.weight) : f32[1,T,4]
  %13 = reshape(%12) {"shape": [1, "T", 2, 2]} : f32[1,T,2,2]
  %14 = attention(%7, %11, %13, %cu_seqlens) {"scale": 0.7, "causal": true, "sliding_window": 0, "softcap": 0.0} : f32[1,T,4,2]
  %15 = reshape(%14) {"shape": [1, "T", 8]} : f32[1,T,8]
  @model.layers.0.self_attn.o_proj.weight = param : f32[8,8]
  %16 = linear(%15, @model.layers.0.self_attn.o_proj.weight) : f32[1,T,8]
  %17 = add(%0, %16) : f32[1,T,8]
  %18 = exp(%17) : f32[1,T,8]
  @model.layers.0.post_attention_layernorm.weight = param : f32[8]
  %19 = rms_norm(%17, @model.layers.0.post_attention_layernorm.weight) {"normalized_shape": [8], "eps": 1e-06} : f32[1,T,8]
  @model.layers.0.mlp.gate_proj.weight = param : f32[12,8]
  %20 = linear(%19, @model.layers.0.mlp.gate_proj.weight) : f32[1,T,12]
  %21 = silu(%20) : f32[1,T,12]
  @model.layers.0.mlp.up_proj.weight = param : f32[12,8]
  %22 = linear(%19, @model.layers.0.mlp.up_proj.weight) : f32[1,T,12]
  %23 = mul(%21, %22) : f32[1,T,12]
  @model.layers.0.mlp.down_proj.weight = param : f32[8,12]
  %24 = linear(%23, @model.layers.0.mlp.down_proj.weight) : f32[1,T,8]
  %25 = add(%17, %24) : f32[1,T,8]
  @model.norm.weight = param : f32[8]
  %26 = rms_norm(%25, @model.norm.weight) {"normalized_shape": [8], "eps": 1e-06} : f32[1,T,8]
  @lm_head.weight = param : f32[16,8]
  %27 = linear(%26, @lm_head.weight) : f32[1,T,16]
  %28 = div(%27, 30.0) : f32[1,T,16]
  %29 = tanh(%28) : f32[1,T,16]
  %30 = mul(%29, 30.0) : f32[1,T,16]
  return %30
}"""


def _lm() -> Graph:
    graph = parse_graph(LM)
    graph.meta["vocab_size"] = VOCAB
    return graph


def _names(names: list[str]) -> list[Pass]:
    return [get_pass(n) for n in names]


# -- passes written for these tests: correct ones and deliberately broken ones ----------------


@dataclass(frozen=True)
class SubAsAddNeg(Pass):
    """Correct: sub(a, b) -> add(a, neg(b))."""

    name = "sub-as-add-neg"

    def apply(self, graph: Graph) -> Graph:
        return graph.rewrite(
            lambda n: (
                make("add", [n.inputs[0], make("neg", [n.inputs[1]])]) if n.op == "sub" else None
            )
        )


@dataclass(frozen=True)
class SwapSubOperands(Pass):
    """Broken: sub(a, b) -> sub(b, a) (types unchanged, so only numerics can tell)."""

    name = "swap-sub"

    def apply(self, graph: Graph) -> Graph:
        return graph.rewrite(lambda n: n.replace(inputs=n.inputs[::-1]) if n.op == "sub" else None)


@dataclass(frozen=True)
class ChangeEps(Pass):
    """Broken: every rms_norm's eps set to `eps`."""

    name = "change-eps"
    eps: float = 1.0

    def apply(self, graph: Graph) -> Graph:
        return graph.rewrite(
            lambda n: n.replace(attrs={**n.attrs, "eps": self.eps}) if n.op == "rms_norm" else None
        )


@dataclass(frozen=True)
class DisableCausalMask(Pass):
    """Broken: attention stops being causal (the last token of each sequence cannot tell)."""

    name = "disable-causal-mask"

    def apply(self, graph: Graph) -> Graph:
        return graph.rewrite(
            lambda n: n.replace(attrs={**n.attrs, "causal": False}) if n.op == "attention" else None
        )


@dataclass(frozen=True)
class MistypeExp(Pass):
    """Broken: records a type the op's rule disagrees with."""

    name = "mistype-exp"

    def apply(self, graph: Graph) -> Graph:
        return graph.rewrite(
            lambda n: (
                n.replace(type=n.type.__class__("float16", n.type.shape)) if n.op == "exp" else None
            )
        )


@dataclass(frozen=True)
class Record(Pass):
    """Identity that appends its label to a shared log."""

    name = "record"
    label: str = ""
    log: list = field(default_factory=list, compare=False)

    def apply(self, graph: Graph) -> Graph:
        self.log.append(self.label)
        return graph


SUB_GRAPH = """graph {
  %input_ids = input : i64[T]
  @embed = param : f32[16,8]
  %0 = embedding(@embed, %input_ids) : f32[T,8]
  @norm = param : f32[8]
  %1 = rms_norm(%0, @norm) {"normalized_shape": [8], "eps": 1e-06} : f32[T,8]
  %2 = exp(%0) : f32[T,8]
  %3 = sub(%1, %2) : f32[T,8]
  return %3
}"""


def _sub_graph() -> Graph:
    graph = parse_graph(SUB_GRAPH)
    graph.meta["vocab_size"] = VOCAB
    return graph


# -- order, dumps, report ----------------------------------------------------------------------


def test_passes_run_in_order():
    log: list[str] = []
    passes = [Record(label=c, log=log) for c in "abcab"]
    PassManager(passes).run(_sub_graph())
    assert log == list("abcab")


def test_dump_dir_has_one_file_per_pass_in_order(tmp_path):
    names = ["canonicalize", "cse", "dce", "merge-projections", "last-token-logits", "dce"]
    manager = PassManager(_names(names), dump_dir=tmp_path / "ir")
    result = manager.run(_lm())
    files = sorted(p.name for p in (tmp_path / "ir").iterdir())
    assert files == [
        "00-input.ir", "01-canonicalize.ir", "02-cse.ir", "03-dce.ir",
        "04-merge-projections.ir", "05-last-token-logits.ir", "06-dce.ir",
    ]  # fmt: skip
    texts = [(tmp_path / "ir" / f).read_text() for f in files]
    assert texts[0] == canonical(LM)
    assert texts[-1] == print_graph(result)
    for name, prev, text in zip(names, texts[:-1], texts[1:], strict=True):
        verify(parse_graph(text))
        assert print_graph(get_pass(name).apply(parse_graph(prev))) == text, name
    assert [e["pass"] for e in manager.report] == names
    assert [e["nodes"] for e in manager.report] == [len(parse_graph(t).ops()) for t in texts[1:]]


def test_no_dump_dir_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    PassManager(_names(["dce"])).run(_lm())
    assert list(tmp_path.iterdir()) == []


def test_reference_pipeline_end_to_end_with_numerics():
    names = resolve_pipeline("reference", None)
    graph = _lm()
    manager = PassManager(
        _names(names), check_numerics=True, weights=weight_fn(random_weights(graph))
    )
    result = manager.run(graph)
    text = print_graph(result)
    assert [e["pass"] for e in manager.report] == names
    assert all(e["max_rel_error"] <= 1e-4 for e in manager.report)
    assert result.input("input_ids").type.shape == ("T",)
    assert result.input("logits_indices").type.shape == ("R",)
    assert result.outputs[0].type.shape == ("R", VOCAB)
    assert text.count("= linear(") == 5  # qkv, o, gate+up, down, lm_head
    assert text.count("= cos(") == 1 and "exp(" not in text
    assert '"shape": [1,' not in text


# -- the verifier after every pass -------------------------------------------------------------


def test_invalid_graph_from_a_pass_names_the_pass():
    manager = PassManager([get_pass("dce"), MistypeExp(), get_pass("cse")])
    with pytest.raises(
        VerifyError,
        match=r"after pass 'mistype-exp': recorded type f16\[T,8\] but the rule gives f32\[T,8\]",
    ):
        manager.run(_sub_graph())
    assert [e["pass"] for e in manager.report] == ["dce"]


def test_invalid_input_graph_is_rejected_before_any_pass():
    log: list[str] = []
    bad = parse_graph(SUB_GRAPH.replace("%2 = exp(%0) : f32[T,8]", "%2 = exp(%0) : f32[T,9]"))
    with pytest.raises(VerifyError, match="recorded type f32\\[T,9\\]") as info:
        PassManager([Record(label="x", log=log)]).run(bad)
    assert "after pass" not in str(info.value)
    assert log == []


# -- --verify: differential numerics after every pass -----------------------------------------


@pytest.mark.parametrize(
    "broken", [SwapSubOperands(), ChangeEps(eps=1.0), ChangeEps(eps=0.3)], ids=lambda p: f"{p.name}"
)
def test_check_numerics_catches_a_broken_pass(broken):
    graph = _sub_graph()
    weights = weight_fn(random_weights(graph))
    manager = PassManager(
        [get_pass("cse"), broken, get_pass("dce")], check_numerics=True, weights=weights
    )
    with pytest.raises(
        VerifyError,
        match=f"pass '{broken.name}' changed what the graph computes: output 0 differs by",
    ):
        manager.run(graph)
    assert [e["pass"] for e in manager.report] == ["cse"]


def test_check_numerics_passes_a_correct_pass():
    graph = _sub_graph()
    manager = PassManager(
        [SubAsAddNeg(), ChangeEps(eps=1e-6)],
        check_numerics=True,
        weights=weight_fn(random_weights(graph)),
    )
    result = manager.run(graph)
    assert "sub(" not in print_graph(result) and "neg(" in print_graph(result)
    assert [e["pass"] for e in manager.report] == ["sub-as-add-neg", "change-eps"]
    assert all(0.0 <= e["max_rel_error"] <= 1e-6 for e in manager.report)


def test_without_check_numerics_a_broken_pass_goes_through():
    result = PassManager([SwapSubOperands()]).run(_sub_graph())
    (sub,) = [n for n in result.nodes if n.op == "sub"]
    assert [i.op for i in sub.inputs] == ["exp", "rms_norm"]


def test_check_numerics_needs_weights():
    with pytest.raises(ValueError, match="check_numerics needs weights"):
        PassManager([get_pass("dce")], check_numerics=True).run(_sub_graph())


def test_check_equivalent_rejects_changed_output_count_and_shape():
    graph = _sub_graph()
    weights = weight_fn(random_weights(graph))
    two = Graph(graph.nodes, [graph.outputs[0], graph.outputs[0]], dict(graph.meta))
    with pytest.raises(VerifyError, match=r"pass 'p' changed the number of outputs \(1 -> 2\)"):
        check_equivalent("p", graph, two, weights)
    narrow = make("slice", [graph.outputs[0]], dim=1, start=0, end=4, step=1)
    with pytest.raises(VerifyError, match=r"pass 'p' changed output 0 from \(19, 8\) to \(19, 4\)"):
        check_equivalent(
            "p", graph, Graph([*graph.nodes, narrow], [narrow], dict(graph.meta)), weights
        )


def test_check_numerics_catches_a_pass_that_drops_the_causal_mask():
    graph = _lm()
    graph = get_pass("canonicalize").apply(graph)
    manager = PassManager(
        [DisableCausalMask()], check_numerics=True, weights=weight_fn(random_weights(graph))
    )
    with pytest.raises(
        VerifyError, match="pass 'disable-causal-mask' changed what the graph computes"
    ):
        manager.run(graph)


def test_check_numerics_on_a_graph_with_a_rank1_output():
    graph = parse_graph(
        SUB_GRAPH.replace(
            "  return %3", '  %4 = sum(%3) {"dims": [1], "keepdim": false} : f32[T]\n  return %4'
        )
    )
    graph.meta["vocab_size"] = VOCAB
    verify(graph)
    PassManager([SubAsAddNeg()], check_numerics=True, weights=weight_fn(random_weights(graph))).run(
        graph
    )


# -- registry and pipelines ------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(PASSES))
def test_registered_passes(name):
    p = get_pass(name)
    assert isinstance(p, Pass) and p.name == name
    assert (type(p).__doc__ or "").strip()
    with pytest.raises(AttributeError):
        p.name_of_nothing = 1  # frozen dataclass


def test_get_pass_unknown_lists_registered():
    with pytest.raises(
        ValueError, match=r"unknown pass 'fuse-everything'; registered passes: canonicalize, dce"
    ):
        get_pass("fuse-everything")


def test_pipeline_unknown_target():
    with pytest.raises(ValueError, match="no pass pipeline for target 'tpu'; known: reference"):
        pipeline("tpu")
    with pytest.raises(ValueError, match="target 'tpu'"):
        resolve_pipeline("tpu", "+dce")


def test_resolve_pipeline_default_and_copy():
    default = pipeline("reference")
    assert resolve_pipeline("reference", None) == default
    assert resolve_pipeline("reference", "") == default
    resolve_pipeline("reference", None).append("cse")
    assert pipeline("reference") == default  # callers get a copy


@pytest.mark.parametrize(
    ("spec", "edit"),
    [
        ("+cse", lambda d: [*d, "cse"]),
        ("-dce", lambda d: [n for n in d if n != "dce"]),
        ("-dce,+dce", lambda d: [*(n for n in d if n != "dce"), "dce"]),
        (
            " +cse , -merge-projections ",
            lambda d: [*(n for n in d if n != "merge-projections"), "cse"],
        ),
        (
            "-canonicalize,-cse,-dce,-merge-projections,-last-token-logits",
            lambda d: [
                n
                for n in d
                if n not in {"canonicalize", "cse", "dce", "merge-projections", "last-token-logits"}
            ],
        ),
    ],
)
def test_resolve_pipeline_edits(spec, edit):
    assert resolve_pipeline("reference", spec) == edit(pipeline("reference"))


def test_resolve_pipeline_full_replacement():
    assert resolve_pipeline("reference", "canonicalize, dce,dce") == ["canonicalize", "dce", "dce"]
    assert resolve_pipeline("reference", "cse") == ["cse"]


@pytest.mark.parametrize(
    "spec", ["canonicalize,fuse-everything", "+fuse-everything", "canonicalize,+dce"]
)
def test_resolve_pipeline_unknown_pass(spec):
    with pytest.raises(ValueError, match="unknown pass"):
        resolve_pipeline("reference", spec)


def test_resolve_pipeline_unknown_pass_in_removal():
    with pytest.raises(ValueError, match="unknown pass 'merge-projection'"):
        resolve_pipeline("reference", "-merge-projection")


def test_check_numerics_report_for_real_passes():
    graph = _lm()
    names = ["canonicalize", "cse", "dce"]
    manager = PassManager(
        _names(names), check_numerics=True, weights=weight_fn(random_weights(graph))
    )
    manager.run(graph)
    assert [sorted(e) for e in manager.report] == [["max_rel_error", "nodes", "pass"]] * 3


def test_manager_does_not_mutate_the_input_graph():
    graph = _lm()
    before = print_graph(graph)
    nodes = list(graph.nodes)
    PassManager(
        _names(["canonicalize", "cse", "dce", "merge-projections", "last-token-logits"])
    ).run(graph)
    assert print_graph(graph) == before
    assert graph.nodes == nodes
