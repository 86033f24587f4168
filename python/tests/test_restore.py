"""load_state_dict / apply_ / swap_ against what the CLI's `decompress` wrote."""

import numpy as np
import pytest
import torch

import udelta
from conftest import (
    as_numpy,
    base_state_dict,
    cli,
    module_from_state_dict,
    read_safetensors,
    torch_bytes,
)

TORCH_NAMES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.uint8: "U8",
}


def assert_same_as_decompress(state, expected, to_bytes):
    assert set(state) == set(expected)
    for name, (dtype, shape, data) in expected.items():
        t = state[name]
        assert tuple(t.shape) == shape, name
        assert to_bytes(t) == data, f"{name}: bytes differ from decompress"


def test_load_state_dict_np_is_bit_identical(pair):
    state = udelta.load_state_dict(pair.base, pair.udelta[0], framework="np")
    expected = pair.expected
    assert set(state) == set(expected)
    for name, entry in expected.items():
        want = as_numpy(entry)
        assert state[name].dtype == want.dtype, name
        assert state[name].tobytes() == entry[2], name


def test_load_state_dict_pt_is_bit_identical_in_own_dtypes(pair):
    state = udelta.load_state_dict(pair.base, pair.udelta[0], framework="pt")
    expected = pair.expected
    for name, (dtype, _, _) in expected.items():
        assert TORCH_NAMES[state[name].dtype] == dtype, name
    assert_same_as_decompress(state, expected, torch_bytes)


def test_apply_to_state_dict_is_bit_identical(pair):
    state = base_state_dict(pair)
    udelta.apply_(state, pair.udelta[0])
    assert_same_as_decompress(state, pair.expected, torch_bytes)


def test_apply_to_module_is_bit_identical_and_in_place(pair):
    model = module_from_state_dict(base_state_dict(pair))
    before = {k: v.data_ptr() for k, v in model.state_dict().items()}
    udelta.apply_(model, pair.udelta[0])
    state = model.state_dict()
    assert_same_as_decompress(state, pair.expected, torch_bytes)
    f = udelta.open(pair.udelta[0])
    for name in f.tensors:
        if f.kind(name) == "compressed" and f.shape(name) == tuple(f.record(name)["base_shape"]):
            assert state[name].data_ptr() == before[name], f"{name} was not changed in place"


def test_kept_values_are_what_decompress_adds(tmp_path):
    from conftest import make_pair

    pair = make_pair(tmp_path, dtype="f32")
    f = udelta.open(pair.udelta[0])
    base, restored = read_safetensors(pair.base), pair.expected
    compressed = [n for n in f.tensors if f.kind(n) == "compressed"]
    assert compressed
    for name in compressed:
        positions, values = f.kept(name)
        assert positions.dtype == np.int64 and values.dtype == np.float32
        assert np.all(np.diff(positions) > 0)
        b = as_numpy(base[name]).reshape(-1)
        r = as_numpy(restored[name]).reshape(-1)
        want = b.copy()
        want[positions] = b[positions] + values  # f32 add, recomputed here
        assert want.tobytes() == r.tobytes(), name
        dense = f.delta(name).reshape(-1)
        assert np.count_nonzero(dense) <= len(positions)
        assert np.array_equal(dense[positions], values)


def test_delta_matches_cli_delta_only(tmp_path, two_models):
    from conftest import cli

    out = tmp_path / "deltas"
    cli("decompress", two_models.udelta[0], "--base", two_models.base, "-o", out, "--delta-only", "-q")
    f = udelta.open(two_models.udelta[0])
    for name, entry in read_safetensors(out).items():
        assert f.delta(name).tobytes() == entry[2], name


def test_swap_equals_fresh_load(two_models):
    a, b = two_models.udelta
    model = module_from_state_dict(base_state_dict(two_models))
    udelta.apply_(model, a)
    assert_same_as_decompress(model.state_dict(), read_safetensors(two_models.restored[0]), torch_bytes)
    udelta.swap_(model, a, b)
    assert_same_as_decompress(model.state_dict(), read_safetensors(two_models.restored[1]), torch_bytes)
    udelta.swap_(model, b, a)
    assert_same_as_decompress(model.state_dict(), read_safetensors(two_models.restored[0]), torch_bytes)


def test_swap_on_state_dict_with_record(two_models):
    a, b = two_models.udelta
    state = base_state_dict(two_models)
    applied = udelta.apply_(state, a)
    udelta.swap_(state, a, b, applied=applied)
    assert_same_as_decompress(state, read_safetensors(two_models.restored[1]), torch_bytes)


class _FailingSwap:
    """A file handle whose ``swap_at`` fails for one tensor (as an overflow or a corrupt
    stream would), delegating everything else."""

    def __init__(self, inner, name):
        self._inner, self._name = inner, name

    def __getattr__(self, attr):
        return getattr(self._inner, attr)

    def swap_at(self, name, *args):
        if name == self._name:
            raise udelta.UdeltaError(f"tensor '{name}': injected failure")
        return self._inner.swap_at(name, *args)


def test_a_swap_failing_midway_leaves_each_tensor_at_the_base_or_the_second_fine_tune(two_models, monkeypatch):
    a, b = two_models.udelta
    base = base_state_dict(two_models)
    state = {k: v.clone() for k, v in base.items()}
    applied = udelta.apply_(state, a)
    switched_in_one_pass = [n for n, old in applied.scattered.items() if isinstance(old, bytearray)]
    victim = switched_in_one_pass[len(switched_in_one_pass) // 2]
    real_open = udelta.open

    def open_failing(path):
        f = real_open(path)
        if str(path) == str(b):
            f._file = _FailingSwap(f._file, victim)
        return f

    monkeypatch.setattr(udelta, "open", open_failing)
    with pytest.raises(udelta.UdeltaError, match="injected failure"):
        udelta.swap_(state, a, b, applied=applied)
    fresh_b = read_safetensors(two_models.restored[1])
    assert torch_bytes(state[victim]) == torch_bytes(base[victim]), "the failed tensor is not the base"
    for name, t in state.items():
        at_base = name in base and torch_bytes(t) == torch_bytes(base[name])
        at_b = name in fresh_b and torch_bytes(t) == fresh_b[name][2]
        assert at_base or at_b, f"{name}: neither the base nor the second fine-tune"
    assert not applied.scattered, "the first file's record still holds entries"


def non_contiguous(t):
    """The same values as ``t`` in a strided (non-contiguous) layout."""
    if t.dim() < 2 or min(t.shape[-2:]) < 2:
        return t
    v = t.transpose(-1, -2).contiguous().transpose(-1, -2)
    assert not v.is_contiguous() and torch.equal(v, t)
    return v


def test_apply_and_swap_on_strided_tensors_take_the_torch_path_bit_identically(two_models):
    # Every 2-D tensor strided: apply_ cannot scatter in its memory (the path of device
    # tensors), while the 1-D ones still go in place: both paths in one model.
    a, b = two_models.udelta
    state = {k: non_contiguous(v) for k, v in base_state_dict(two_models).items()}
    applied = udelta.apply_(state, a)
    assert any(not isinstance(v, bytearray) for v in applied.scattered.values())
    assert_same_as_decompress(state, read_safetensors(two_models.restored[0]), torch_bytes)
    udelta.swap_(state, a, b, applied=applied)
    assert_same_as_decompress(state, read_safetensors(two_models.restored[1]), torch_bytes)


def test_swap_frees_the_first_record_before_applying_the_second(two_models):
    a, b = two_models.udelta
    state = base_state_dict(two_models)
    first = udelta.apply_(state, a)
    assert first.nbytes() > 0
    udelta.swap_(state, a, b, applied=first)
    assert first.nbytes() == 0 and not first.scattered and not first.replaced


def test_fused_experts_apply_and_swap_per_matrix_bit_identically(fused_experts):
    a, b = fused_experts.udelta
    assert any(r.get("matrix_of") for r in udelta.open(a).index["tensors"])
    model = module_from_state_dict(base_state_dict(fused_experts))
    udelta.apply_(model, a)
    assert_same_as_decompress(model.state_dict(), read_safetensors(fused_experts.restored[0]), torch_bytes)
    udelta.swap_(model, a, b)
    assert_same_as_decompress(model.state_dict(), read_safetensors(fused_experts.restored[1]), torch_bytes)
    state = {k: non_contiguous(v) for k, v in base_state_dict(fused_experts).items()}
    udelta.apply_(state, b)
    assert_same_as_decompress(state, read_safetensors(fused_experts.restored[1]), torch_bytes)


def test_fused_experts_of_another_shape_are_refused_naming_the_tensor(fused_experts):
    state = base_state_dict(fused_experts)
    name = next(k for k in state if k.endswith("mlp.experts.down_proj"))
    state[name] = state[name][:-1].clone()
    with pytest.raises(udelta.UdeltaError, match="down_proj.*wrong base"):
        udelta.apply_(state, fused_experts.udelta[0])


def test_swap_refuses_a_file_not_applied(two_models):
    a, b = two_models.udelta
    model = module_from_state_dict(base_state_dict(two_models))
    with pytest.raises(udelta.UdeltaError, match="nothing was applied"):
        udelta.swap_(model, a, b)
    udelta.apply_(model, a)
    with pytest.raises(udelta.UdeltaError, match="the model holds"):
        udelta.swap_(model, b, a)


def test_apply_refuses_a_wrong_base_and_changes_nothing(two_models):
    state = base_state_dict(two_models)
    f = udelta.open(two_models.udelta[0])
    victim = [n for n in f.tensors if f.kind(n) == "compressed"][-1]
    flat = state[victim].view(-1)
    flat[7] = flat[7] + 1
    snapshot = {k: torch_bytes(v) for k, v in state.items()}
    with pytest.raises(udelta.UdeltaError, match=f"tensor '{victim}'.*checksum mismatch"):
        udelta.apply_(state, two_models.udelta[0])
    assert {k: torch_bytes(v) for k, v in state.items()} == snapshot
    udelta.apply_(state, two_models.udelta[0], force=True)


def test_apply_refuses_a_wrong_shape(two_models):
    state = base_state_dict(two_models)
    f = udelta.open(two_models.udelta[0])
    victim = [n for n in f.tensors if f.kind(n) == "compressed"][0]
    state[victim] = state[victim][:-1].clone()
    with pytest.raises(udelta.UdeltaError, match="wrong base"):
        udelta.apply_(state, two_models.udelta[0])


def test_apply_refuses_a_missing_tensor(two_models):
    state = base_state_dict(two_models)
    f = udelta.open(two_models.udelta[0])
    name = [n for n in f.tensors if f.kind(n) == "compressed"][0]
    del state[name]
    with pytest.raises(udelta.UdeltaError, match="missing"):
        udelta.apply_(state, two_models.udelta[0])


def test_load_state_dict_refuses_a_wrong_base(two_models):
    with pytest.raises(udelta.UdeltaError, match="checksum mismatch"):
        udelta.load_state_dict(two_models.fts[1], two_models.udelta[0])


def test_minilm_real_pair(minilm):
    expected = minilm.expected
    assert_same_as_decompress(
        udelta.load_state_dict(minilm.base, minilm.udelta[0]), expected, torch_bytes
    )
    state = base_state_dict(minilm)
    udelta.apply_(state, minilm.udelta[0])
    assert_same_as_decompress(state, expected, torch_bytes)


def test_transformers_from_pretrained_applies_the_file(two_models):
    import udelta.transformers

    from conftest import as_torch

    calls = []

    class FakeAutoModel:
        """Stands in for transformers.AutoModelForCausalLM: loads the base directory."""

        @staticmethod
        def from_pretrained(base_dir, **kwargs):
            calls.append((base_dir, kwargs))
            state = {k: as_torch(v) for k, v in read_safetensors(base_dir).items()}
            return module_from_state_dict(state)

    model = udelta.transformers.from_pretrained(
        two_models.base, two_models.udelta[1], model_class=FakeAutoModel, revision="x"
    )
    assert calls == [(str(two_models.base), {"revision": "x", "torch_dtype": "auto"})]
    expected = read_safetensors(two_models.restored[1])
    assert_same_as_decompress(model.state_dict(), expected, torch_bytes)
    udelta.swap_(model, two_models.udelta[1], two_models.udelta[0])
    assert_same_as_decompress(model.state_dict(), read_safetensors(two_models.restored[0]), torch_bytes)


def test_transformers_from_pretrained_on_the_real_minilm_pair(tmp_path):
    """transformers itself loads the real base directory, the file is applied in place, and the
    weights equal those transformers loads from the directory ``decompress`` writes."""
    from transformers import AutoModel

    import udelta.transformers
    from conftest import MINILM

    base, ft = MINILM / "base", MINILM / "ft"
    file, restored = tmp_path / "ft.udelta", tmp_path / "restored"
    cli("compress", "--base", base, "--finetuned", ft, "-o", file, "--adapter", "cpu", "-q")
    cli("decompress", file, "--base", base, "-o", restored, "-q")
    model = udelta.transformers.from_pretrained(base, file, model_class=AutoModel)
    want = AutoModel.from_pretrained(restored, torch_dtype="auto").state_dict()
    got = model.state_dict()
    assert set(got) == set(want)
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), name


def test_swap_refuses_a_file_of_another_base_with_the_same_shapes(two_models, tmp_path):
    # Another seed: the same tensor names, dtypes and shapes (so the same base fingerprint),
    # other values. swap_ compares the base CRC-32s the two files recorded and refuses it
    # before changing anything.
    cli("synth", "--out", tmp_path, "--preset", "tiny", "--dtype", "bf16", "--seed", 9, "-q")
    other = tmp_path / "other.udelta"
    cli("compress", "--base", tmp_path / "base", "--finetuned", tmp_path / "ft-1", "-o", other,
        "--adapter", "cpu", "-q")
    a = two_models.udelta[0]
    assert udelta.open(other).base_fingerprint == udelta.open(a).base_fingerprint
    model = module_from_state_dict(base_state_dict(two_models))
    udelta.apply_(model, a)
    before = {k: torch_bytes(v) for k, v in model.state_dict().items()}
    with pytest.raises(udelta.UdeltaError, match="another base"):
        udelta.swap_(model, a, other)
    assert {k: torch_bytes(v) for k, v in model.state_dict().items()} == before
