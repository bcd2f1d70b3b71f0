"""NeMo config/model classes and megatron-core layer spec of Puzzle children.

Builds real megatron-core GPT models on the CPU (through the test-only `nemo_cpu_shim`),
checks their structure and parameter count against the arch, loads converted reference
weights strictly and compares logits with the reference model; plus the NeMo io round trip
and config errors. NeMo is imported inside fixtures, so collecting this file costs nothing
where the `nemo` extra is missing (the `nemo` marker skips it there).
"""

import dataclasses
import functools
import json
import re
import types

import pytest
import torch

from nemo_plugins.arch.accounting import count_params
from nemo_plugins.arch.config import (
    ATTENTION_LINEAR,
    ATTENTION_NO_OP,
    FFN_LINEAR,
    ArchConfigError,
    BlockConfig,
    ModelConfig,
    RopeScaling,
    gqa,
    parallel,
    swiglu,
    to_dict,
)
from nemo_plugins.model.checkpoint import read_config
from nemo_plugins.model.llama import HeteroLlamaForCausalLM, rope_inv_freq
from nemo_plugins.nemo.convert import from_mcore, to_mcore
from test_nemo_convert import mixed_arch, parent_arch, reference_state, scaled_super

pytestmark = pytest.mark.nemo

SEQ = 12


@pytest.fixture(scope="module")
def nm():
    """The NeMo-side modules (imported once; ~20 s)."""
    from nemo.collections.llm.gpt.model.llama_nemotron_config import LLAMA_33_NEMOTRON_SUPER_49B_HETEROGENEOUS_CONFIG as SUPER
    import nemo_cpu_shim
    from nemo.lightning import io

    from nemo_plugins.nemo import model, spec

    return types.SimpleNamespace(model=model, spec=spec, io=io, shim=nemo_cpu_shim, super_json=json.loads(SUPER))


@pytest.fixture
def cpu(nm):
    """gloo world of 1, megatron TP1/PP1 and the CPU patches, for one test."""
    with nm.shim.megatron_cpu():
        yield


def build(nm, arch, **overrides):
    """The megatron-core GPTModel of `arch`, built through NeMo on the CPU."""
    cfg = nm.model.nemo_config(arch, seq_length=SEQ, **nm.shim.CPU_OVERRIDES, **overrides)
    model = nm.model.PuzzleChildModel(cfg)
    model.configure_model()
    return model.module


def logits_pair(arch, module, seed=0):
    """Logits of the reference model and of `module` loaded with its converted weights."""
    reference = HeteroLlamaForCausalLM(arch)
    reference.load_state_dict(reference_state(arch, seed))
    module.load_state_dict(to_mcore(arch, reference.state_dict()), strict=True)
    reference.eval(), module.eval()
    torch.manual_seed(seed + 1)
    ids = torch.randint(0, arch.vocab_size, (2, SEQ))
    positions = torch.arange(SEQ)[None].expand(2, -1)
    causal = ~torch.tril(torch.ones(SEQ, SEQ, dtype=torch.bool)).view(1, 1, SEQ, SEQ)  # True = masked
    with torch.no_grad():
        return reference(ids), module(ids, positions, causal)


def assert_close_logits(ref, got):
    assert got.shape == ref.shape
    scale = ref.abs().max().item()
    err = (got - ref).abs().max().item()
    assert err <= 1e-5 * max(scale, 1.0), f"max |logit diff| {err:.3g} at logit scale {scale:.3g}"


def n_params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def kv_heads_of(layer) -> int | None:
    att = layer.self_attention
    return att.config.num_query_groups if hasattr(att, "linear_qkv") else None


# ----------------------------------------------------------------------------- structure


def test_super49b_like_child_builds_with_its_per_layer_shapes(nm, cpu):
    arch = scaled_super(nm.super_json)
    module = build(nm, arch)
    assert n_params(module) == count_params(arch)
    layers = module.decoder.layers
    assert len(layers) == arch.num_layers
    hd, heads, h = arch.kv_channels, arch.num_attention_heads, arch.hidden_size
    for layer, block in zip(layers, arch.blocks):
        if block.attention.kind == "gqa":
            kv = block.attention.num_kv_heads
            assert kv_heads_of(layer) == kv
            assert tuple(layer.self_attention.linear_qkv.weight.shape) == ((heads + 2 * kv) * hd, h)
        else:
            assert type(layer.self_attention).__name__ == "IdentityOp"
            assert type(layer.input_layernorm).__name__ == "IdentityOp"
        assert tuple(layer.mlp.linear_fc2.weight.shape) == (h, block.ffn.intermediate_size)


def test_linear_no_op_and_parallel_blocks_build(nm, cpu):
    arch = mixed_arch()
    module = build(nm, arch)
    assert n_params(module) == count_params(arch)
    kinds = [(type(l.self_attention).__name__, type(l.mlp).__name__) for l in module.decoder.layers]
    assert kinds == [
        ("SelfAttention", "MLP"),
        ("ColumnParallelLinearGathered", "ColumnParallelLinearGathered"),
        ("IdentityOp", "IdentityOp"),
        ("SelfAttention", "MLPWithLinear"),
        ("SelfAttention", "IdentityOp"),
        ("IdentityOp", "MLP"),
    ]
    # KV heads per layer as in the arch (2, 1, 4), not one global value from block 0
    assert [kv_heads_of(l) for l in module.decoder.layers] == [2, None, None, 1, 4, None]
    group = module.decoder.layers[3].mlp
    assert group.linear_fc1.weight.shape[0] == 2 * (16 + 24) and group.linear_fc2.weight.shape[1] == 40
    assert tuple(group.linear_mlp.weight.shape) == (32, 32)
    assert module.decoder.layers[5].mlp.linear_fc2.weight.shape[1] == 48  # swiglu-only group: one wide MLP


def test_converted_weights_load_strictly_and_convert_back(nm, cpu):
    for arch in (mixed_arch(), mixed_arch(tie=True), scaled_super(nm.super_json)):
        module = build(nm, arch)
        state = reference_state(arch)
        module.load_state_dict(to_mcore(arch, state), strict=True)
        back = from_mcore(arch, module.state_dict())  # the model's own dict, _extra_state included
        for k, v in back.items():
            assert torch.equal(v, state[k]), k


def test_sharded_state_dict_of_a_group_with_a_linear_member(nm, cpu):
    sharded = build(nm, mixed_arch()).sharded_state_dict()
    keys = {getattr(v, "key", None) for v in sharded.values()}
    assert {"decoder.layers.3.mlp.linear_fc1.weight", "decoder.layers.3.mlp.linear_mlp.weight"} <= keys
    # the group's norm is a module of its own (TE and local alike), not fused into fc1
    assert "decoder.layers.3.pre_mlp_layernorm.weight" in keys
    assert "decoder.layers.0.mlp.linear_fc1.layer_norm_weight" in keys  # megatron's map for plain layers


def test_pipeline_stages_slice_the_spec_like_megatron(nm):
    arch = mixed_arch()
    cfg = nm.model.nemo_config(arch, pipeline_model_parallel_size=2, pipeline_dtype=torch.float32)
    stages = [nm.spec.puzzle_layer_spec(cfg, use_te=False, pp_rank=r).layer_specs for r in (0, 1)]
    names = [[s.submodules.mlp.module.__name__ for s in stage] for stage in stages]
    assert names == [["MLP", "ColumnParallelLinearGathered", "IdentityOp"], ["MLPWithLinear", "IdentityOp", "MLP"]]


# ----------------------------------------------------------------------------- logits parity


def test_logits_match_reference_super49b_like(nm, cpu):
    arch = scaled_super(nm.super_json)
    assert_close_logits(*logits_pair(arch, build(nm, arch)))


def test_logits_match_reference_linear_and_parallel(nm, cpu):
    for arch in (mixed_arch(), mixed_arch(tie=True)):
        assert_close_logits(*logits_pair(arch, build(nm, arch)))


def test_logits_match_reference_plain_llama_parent(nm, cpu):
    arch = parent_arch()
    assert_close_logits(*logits_pair(arch, build(nm, arch)))


def test_rope_scaling_comes_from_the_arch(nm, cpu):
    scaled = scaled_super(nm.super_json)
    assert scaled.rope_scaling is not None
    for arch in (scaled, parent_arch()):
        module = build(nm, arch)
        want = rope_inv_freq(arch.kv_channels, arch.rope_theta, arch.rope_scaling)
        assert torch.allclose(module.rotary_pos_emb.inv_freq.cpu(), want, rtol=1e-6, atol=0)


def test_parent_matches_nemos_own_llama_config(nm, cpu):
    """A homogeneous arch gives the model NeMo's Llama31Config gives: same names, shapes,
    parameter count and logits."""
    from nemo.collections import llm
    from nemo.collections.llm.gpt.model.llama import Llama31Config

    arch = parent_arch()
    arch = dataclasses.replace(arch, rope_scaling=RopeScaling())  # Llama31Config always scales RoPE
    ours = build(nm, arch)
    theirs = llm.GPTModel(Llama31Config(
        num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=128,
        vocab_size=128, seq_length=SEQ, rotary_base=500_000, **nm.shim.CPU_OVERRIDES,
    ))  # fmt: skip
    theirs.configure_model()
    theirs = theirs.module
    shapes = lambda m: {k: tuple(v.shape) for k, v in m.state_dict().items() if not k.endswith("_extra_state")}  # noqa: E731
    assert shapes(ours) == shapes(theirs)
    assert n_params(ours) == n_params(theirs) == count_params(arch)
    ref, got = logits_pair(arch, ours)
    _, nemo = logits_pair(arch, theirs)
    assert_close_logits(ref, got)
    assert torch.equal(got, nemo)


def test_train_step_runs_with_default_settings(nm, cpu):
    """nemo_config's defaults (fusions on where available) build and train on a CPU too."""
    model = nm.model.PuzzleChildModel(nm.model.nemo_config(mixed_arch(), use_cpu_initialization=True))
    model.configure_model()
    module = model.module
    module.train()
    ids = torch.randint(0, 96, (2, SEQ))
    causal = ~torch.tril(torch.ones(SEQ, SEQ, dtype=torch.bool)).view(1, 1, SEQ, SEQ)
    loss = module(ids, torch.arange(SEQ)[None].expand(2, -1), causal, labels=ids)
    loss.mean().backward()
    assert module.decoder.layers[3].mlp.linear_mlp.weight.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- NeMo io and config errors


def test_io_dump_and_load_context_round_trip_the_arch(nm, tmp_path):
    arch = mixed_arch(tie=True)
    model = nm.model.PuzzleChildModel(nm.model.nemo_config(arch, seq_length=64, bf16=True, params_dtype=torch.bfloat16))
    model.io_dump(tmp_path, yaml_attrs=["config"])
    arch_name = nm.model.arch_file(arch).name  # the architecture travels with the context
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["config.yaml", "io.json", arch_name])  # nothing pickled
    assert read_config(tmp_path / arch_name) == arch
    loaded = nm.io.load_context(tmp_path)
    assert type(loaded) is nm.model.PuzzleChildModel and type(loaded.config) is nm.model.PuzzleChildConfig
    assert nm.model.arch_of(loaded) == arch and to_dict(nm.model.arch_of(loaded.config)) == to_dict(arch)
    assert loaded.config.seq_length == 64 and loaded.config.params_dtype == torch.bfloat16
    assert loaded.config.heterogeneous_layers_config_encoded_json == model.config.heterogeneous_layers_config_encoded_json
    assert [b.attention.num_query_groups for b in loaded.config.per_block_parameters] == [2, None, None, 1, 4, None]


def test_config_fields_come_from_the_arch(nm):
    arch = scaled_super(nm.super_json)
    cfg = nm.model.nemo_config(arch)
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.kv_channels) == (9, 128, 16, 8)
    assert cfg.vocab_size == 256 and cfg.seq_length == arch.max_position_embeddings
    assert cfg.share_embeddings_and_output_weights is False and cfg.rotary_base == 500_000
    assert (cfg.scale_factor, cfg.low_freq_factor, cfg.high_freq_factor, cfg.old_context_len) == (8.0, 1.0, 4.0, 8192)
    widths = [b.mlp.ffn_hidden_size for b in cfg.per_block_parameters]
    assert widths == [b.ffn.intermediate_size for b in arch.blocks]  # explicit, no 256-rounding
    assert nm.model.nemo_config(mixed_arch(tie=True)).share_embeddings_and_output_weights is True
    assert nm.model.nemo_config(mixed_arch()).scale_factor is None


def test_nemo_config_errors(nm):
    arch = mixed_arch()
    with pytest.raises(ArchConfigError, match=r"'tensor_parallel_size' is not a field .*did you mean tensor_model_parallel_size"):
        nm.model.nemo_config(arch, tensor_parallel_size=2)
    with pytest.raises(ArchConfigError, match=r"'hidden_size' is set by the architecture"):
        nm.model.nemo_config(arch, hidden_size=64)
    # KV heads 2 (layer 0), 1 (layer 3), 4 (layer 4): TP=2 splits 2 and 4 and replicates the single head
    assert nm.model.nemo_config(arch, tensor_model_parallel_size=2).tensor_model_parallel_size == 2
    ok = arch.replace_blocks([BlockConfig(gqa(4), swiglu(64)), BlockConfig(gqa(2), swiglu(32))])
    assert nm.model.nemo_config(ok, tensor_model_parallel_size=4).tensor_model_parallel_size == 4
    three = ModelConfig(vocab_size=96, hidden_size=96, num_attention_heads=12, head_dim=8,
                        blocks=(BlockConfig(gqa(6), swiglu(48)), BlockConfig(gqa(4), swiglu(48))))  # fmt: skip
    with pytest.raises(ArchConfigError, match=r"layers\[1\]\.attention: num_kv_heads=4 and tensor_model_parallel_size=3"):
        nm.model.nemo_config(three, tensor_model_parallel_size=3)
    two_linear = arch.replace_blocks([BlockConfig(ATTENTION_NO_OP, parallel(swiglu(8), FFN_LINEAR, FFN_LINEAR))])
    with pytest.raises(ArchConfigError, match=r"layers\[0\]\.ffn: .*1 swiglu and 2 linear"):
        nm.model.nemo_config(two_linear)
    path = nm.model.arch_file(arch)
    with pytest.raises(ArchConfigError, match=r"PuzzleChildConfig\.hidden_size=64 contradicts arch_path='.*' \(which gives 32\)"):
        nm.model.PuzzleChildConfig(arch_path=str(path), hidden_size=64)
    with pytest.raises(ArchConfigError, match=r"PuzzleChildConfig\.arch_path='' *: expected a model's config file"):
        nm.model.PuzzleChildConfig()
    with pytest.raises(ArchConfigError, match=rf"arch_path='{re.escape(str(path.parent))}' is a directory: expected its config file, {re.escape(str(path))}"):
        nm.model.PuzzleChildConfig(arch_path=str(path.parent))
    with pytest.raises(ArchConfigError, match=r"arch_path='/nonexistent/config\.json': no such file"):
        nm.model.PuzzleChildConfig(arch_path="/nonexistent/config.json")


# ----------------------------------------------------------------------------- tensor parallelism (CPU, 2 processes)


def tp_arch():
    """KV heads 2 and 4 (split) and 1 (replicated on both ranks), a linear attention/FFN, a group
    with a linear member and a swiglu-only group: everything TP=2 must split (a group's wide
    SwiGLU is split like any FFN)."""
    return mixed_arch().replace_blocks([
        BlockConfig(gqa(2), swiglu(48)),
        BlockConfig(ATTENTION_LINEAR, FFN_LINEAR),
        BlockConfig(gqa(4), parallel(swiglu(16), FFN_LINEAR, swiglu(24))),
        BlockConfig(ATTENTION_NO_OP, parallel(swiglu(8), swiglu(40))),
        BlockConfig(gqa(1), swiglu(32)),
    ])  # fmt: skip


def tp_shard(key: str, t: torch.Tensor, rank: int, tp: int) -> torch.Tensor:
    """This rank's slice of a full (TP=1) megatron tensor: column-parallel weights by rows
    (fc1 as [gate rows; up rows] of the rank), row-parallel ones by columns, norms whole."""
    if key.endswith("linear_fc1.weight"):
        gate, up = t.chunk(2, 0)
        return torch.cat([gate.chunk(tp, 0)[rank], up.chunk(tp, 0)[rank]])
    if key.endswith(("linear_proj.weight", "linear_fc2.weight")):
        return t.chunk(tp, 1)[rank].contiguous()
    if key.endswith("norm.weight"):
        return t
    return t.chunk(tp, 0)[rank].contiguous()  # qkv (whole query groups), linears, vocab


def _tp_parity_worker(rank, arch_dict, state, ids, ref_logits):
    from nemo_cpu_shim import CPU_OVERRIDES

    from nemo_plugins.arch.config import from_dict
    from nemo_plugins.nemo.model import PuzzleChildModel, nemo_config

    arch, tp = from_dict(arch_dict), torch.distributed.get_world_size()
    cfg = nemo_config(arch, tensor_model_parallel_size=tp, seq_length=SEQ, **CPU_OVERRIDES)
    model = PuzzleChildModel(cfg)
    model.configure_model()
    module = model.module
    module.load_state_dict({k: tp_shard(k, v, rank, tp) for k, v in state.items()}, strict=True)
    module.eval()
    causal = ~torch.tril(torch.ones(SEQ, SEQ, dtype=torch.bool)).view(1, 1, SEQ, SEQ)
    with torch.no_grad():
        logits = module(ids, torch.arange(SEQ)[None].expand(ids.shape[0], -1), causal)
    assert_close_logits(ref_logits.chunk(tp, -1)[rank], logits)  # vocab-parallel output


@pytest.mark.slow
def test_tensor_parallel_2_logits_match_reference():
    """TP=2 in two CPU processes (gloo): per-layer KV heads, linear replacements and fused
    groups split across ranks give the reference logits."""
    import nemo_cpu_shim

    arch = tp_arch()
    reference = HeteroLlamaForCausalLM(arch)
    reference.load_state_dict(reference_state(arch))
    reference.eval()
    ids = torch.randint(0, arch.vocab_size, (2, SEQ))
    with torch.no_grad():
        ref_logits = reference(ids)
    state = to_mcore(arch, reference.state_dict())
    nemo_cpu_shim.run_cpu_world(_tp_parity_worker, 2, to_dict(arch), state, ids, ref_logits)


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
def test_logits_match_reference_on_cuda(nm):
    """The same parity on a GPU, with megatron's real CUDA RNG tracker and no shim."""
    import os

    import torch.distributed as dist
    from megatron.core import parallel_state, tensor_parallel

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(nm.shim._free_port()))
    started = not dist.is_initialized()
    if started:
        dist.init_process_group("nccl", rank=0, world_size=1)
    parallel_state.initialize_model_parallel(1, 1)
    try:
        tensor_parallel.model_parallel_cuda_manual_seed(1234)
        local_spec = functools.partial(nm.spec.puzzle_layer_spec, use_te=False)  # convert.py uses local names
        for arch in (scaled_super(nm.super_json), mixed_arch()):
            cfg = nm.model.nemo_config(arch, seq_length=SEQ, transformer_layer_spec=local_spec, apply_rope_fusion=False)
            model = nm.model.PuzzleChildModel(cfg)
            model.configure_model()
            module = model.module.cuda()
            reference = HeteroLlamaForCausalLM(arch)
            reference.load_state_dict(reference_state(arch))
            reference.cuda().eval()
            module.load_state_dict(to_mcore(arch, reference.state_dict()), strict=True)
            module.eval()
            ids = torch.randint(0, arch.vocab_size, (2, SEQ), device="cuda")
            positions = torch.arange(SEQ, device="cuda")[None].expand(2, -1)
            causal = ~torch.tril(torch.ones(SEQ, SEQ, dtype=torch.bool, device="cuda")).view(1, 1, SEQ, SEQ)
            with torch.no_grad():
                assert_close_logits(reference(ids).float().cpu(), module(ids, positions, causal).float().cpu())
    finally:
        parallel_state.destroy_model_parallel()
        if started:
            dist.destroy_process_group()
