"""inspect / open / compress / decompress / rescale mirror the CLI; bad input raises UdeltaError."""

import json
import shutil

import numpy as np
import pytest

import udelta
from conftest import CLI, cli, read_safetensors


def test_inspect_matches_cli_json(two_models):
    info = udelta.inspect(two_models.udelta[0])
    assert info["report"] == json.loads(cli("inspect", two_models.udelta[0], "--json"))
    index = info["index"]
    assert index["format_version"] == 2
    names = [r["name"] for r in index["tensors"]]
    assert set(names) == set(read_safetensors(two_models.restored[0]))


def test_open_metadata(two_models):
    f = udelta.open(two_models.udelta[0])
    report = json.loads(cli("inspect", two_models.udelta[0], "--json"))
    assert f.base_fingerprint == f.index["base"]["fingerprint"] != ""
    assert f.gamma > 0 and f.scale > 0
    assert f.params["sparsity"] == pytest.approx(0.95)
    expected = read_safetensors(two_models.restored[0])
    for name in f.tensors:
        dtype, shape, _ = expected[name]
        assert f.dtype(name) == dtype and f.shape(name) == shape
    rates = f.rates()
    assert rates and all(0 < r < 1 for r in rates.values())
    assert set(rates) == {r["name"] for r in f.index["tensors"] if r["kind"] == "compressed"}
    assert report["file_bytes"] == two_models.udelta[0].stat().st_size


def test_stored_is_the_fine_tunes_tensor(tmp_path):
    from conftest import make_pair

    pair = make_pair(tmp_path, dtype="f32", vocab_growth=4)
    f = udelta.open(pair.udelta[0])
    coded = [n for n in f.tensors if f.kind(n) == "coded"]
    assert coded, "the synthetic fine-tune stores some tensors whole"
    ft = read_safetensors(pair.fts[0])
    for name in coded:
        assert f.stored(name, base=pair.base).tobytes() == ft[name][2], name
    against_base = [n for n in coded if f.record(n)["base"] is not None][0]
    with pytest.raises(udelta.UdeltaError, match="pass the base checkpoint"):
        f.stored(against_base)
    compressed = [n for n in f.tensors if f.kind(n) == "compressed"][0]
    with pytest.raises(udelta.UdeltaError, match="not stored whole"):
        f.stored(compressed)
    with pytest.raises(udelta.UdeltaError, match="not a compressed tensor"):
        f.kept(coded[0])
    with pytest.raises(udelta.UdeltaError, match="no tensor named"):
        f.kept("nope")


def test_compress_and_decompress_mirror_the_cli(tmp_path, two_models):
    out = tmp_path / "py.udelta"
    files = udelta.compress(
        two_models.base, two_models.fts[0], out, adapter="cpu", progress=False
    )
    assert files == [str(out)]
    assert out.read_bytes() == two_models.udelta[0].read_bytes()
    restored = tmp_path / "restored"
    udelta.decompress(out, two_models.base, restored, progress=False)
    assert read_safetensors(restored) == read_safetensors(two_models.restored[0])
    with pytest.raises(udelta.UdeltaError, match="exists"):
        udelta.decompress(out, two_models.base, restored, progress=False)
    with pytest.raises(udelta.UdeltaError, match="invalid parameter"):
        udelta.compress(two_models.base, two_models.fts[0], tmp_path / "x.udelta", sparsity=1.5)


def test_target_ratio_and_plan_mirror_the_cli(tmp_path, two_models):
    import json

    base, ft = two_models.base, two_models.fts[0]
    out, by_cli = tmp_path / "py.udelta", tmp_path / "cli.udelta"
    udelta.compress(base, ft, out, target_ratio=20, adapter="cpu", progress=False)
    cli("compress", "--base", base, "--finetuned", ft, "-o", by_cli, "--target-ratio", "20",
        "--adapter", "cpu", "-q")
    assert out.read_bytes() == by_cli.read_bytes()
    sized = tmp_path / "sized.udelta"
    udelta.compress(base, ft, sized, target_size="30KB", adapter="cpu", progress=False)
    cli("compress", "--base", base, "--finetuned", ft, "-o", by_cli, "--target-size", "30KB",
        "--adapter", "cpu", "-q", "--force")
    assert sized.read_bytes() == by_cli.read_bytes()
    plan = udelta.plan(base, ft, tmp_path / "never.udelta", embeddings="lossless")
    want = json.loads(cli("compress", "--base", base, "--finetuned", ft, "-o", tmp_path / "never.udelta",
                          "--embeddings", "lossless", "--dry-run", "--json"))
    assert plan == want
    assert not (tmp_path / "never.udelta").exists()
    with pytest.raises(udelta.UdeltaError, match="not both"):
        udelta.compress(base, ft, tmp_path / "x.udelta", sparsity=0.9, target_ratio=20)
    with pytest.raises(udelta.UdeltaError, match="not both"):
        udelta.compress(base, ft, tmp_path / "x.udelta", target_size=1000, target_ratio=20)
    with pytest.raises(TypeError, match="unexpected"):
        udelta.plan(base, ft, tmp_path / "x.udelta", sparsityy=0.9)


def test_cluster_flow_matches_joint_compression(tmp_path, two_models):
    """scripts/compress-many.sh: one process per fine-tune with --trace-norm, then rescale."""
    import subprocess

    from conftest import REPO

    out = tmp_path / "many"
    subprocess.run(
        [str(REPO / "scripts" / "compress-many.sh"), str(two_models.base), str(out),
         *map(str, two_models.fts)],
        check=True, env={"UDELTA": CLI, "UDELTA_ARGS": "--adapter cpu", "PATH": "/usr/bin:/bin"},
    )
    joint = tmp_path / "joint"
    cli("compress", "--base", two_models.base, "--finetuned", two_models.fts[0],
        "--finetuned", two_models.fts[1], "-o", joint, "--adapter", "cpu", "-q")
    for ft in two_models.fts:
        name = ft.name + ".udelta"
        separate, together = udelta.open(out / name), udelta.open(joint / name)
        assert separate.gamma == pytest.approx(together.gamma, rel=1e-9)
        assert separate.gamma <= 1.0
    assert min(udelta.open(out / (ft.name + ".udelta")).gamma for ft in two_models.fts) < 1.0


def test_rescale_mirrors_the_cli(tmp_path, two_models):
    files = []
    for ft in two_models.fts:
        f = tmp_path / (ft.name + ".udelta")
        udelta.compress(two_models.base, ft, f, adapter="cpu", trace_norm=True, progress=False)
        files.append(f)
    gammas = udelta.rescale(files)
    assert gammas == [udelta.open(f).gamma for f in files]
    with pytest.raises(udelta.UdeltaError):
        udelta.rescale([files[0], tmp_path / "missing.udelta"])


# ------------------------------------------------------------------------- bad input


def test_missing_and_non_udelta_files_raise(tmp_path, two_models):
    with pytest.raises(udelta.UdeltaError, match="missing.udelta"):
        udelta.open(tmp_path / "missing.udelta")
    junk = tmp_path / "junk.udelta"
    junk.write_bytes(b"not a udelta file at all" * 10)
    for call in (udelta.open, udelta.inspect):
        with pytest.raises(udelta.UdeltaError, match="junk.udelta"):
            call(junk)
    with pytest.raises(udelta.UdeltaError):
        udelta.load_state_dict(two_models.base, junk)
    with pytest.raises(udelta.UdeltaError):
        udelta.load_state_dict(tmp_path / "no-base", two_models.udelta[0])
    empty = tmp_path / "empty.udelta"
    empty.write_bytes(b"")
    with pytest.raises(udelta.UdeltaError):
        udelta.open(empty)


def test_truncated_files_raise(tmp_path, two_models):
    data = two_models.udelta[0].read_bytes()
    for cut in (1, 8, 16, len(data) // 3, len(data) // 2, len(data) - 64, len(data) - 1):
        f = tmp_path / f"cut-{cut}.udelta"
        f.write_bytes(data[:cut])
        with pytest.raises(udelta.UdeltaError):
            udelta.load_state_dict(two_models.base, f, framework="np")


def test_corrupted_files_raise(tmp_path, two_models):
    """A flipped byte anywhere is caught (records and index carry CRC-32s), never a crash."""
    data = two_models.udelta[0].read_bytes()
    rng = np.random.default_rng(0)
    offsets = sorted(set([0, 4, 9, len(data) - 1, len(data) - 9] + list(rng.integers(0, len(data), 40))))
    for off in offsets:
        bad = bytearray(data)
        bad[off] ^= 0x5A
        f = tmp_path / "bad.udelta"
        f.write_bytes(bytes(bad))
        with pytest.raises(udelta.UdeltaError):
            f_ = udelta.open(f)
            for name in f_.tensors:
                if f_.kind(name) == "compressed":
                    f_.kept(name)
            udelta.load_state_dict(two_models.base, f, framework="np")


def test_errors_carry_the_cli_message(tmp_path, two_models):
    import subprocess

    junk = tmp_path / "junk.udelta"
    junk.write_bytes(b"\0" * 100)
    p = subprocess.run([CLI, "inspect", str(junk)], capture_output=True, text=True)
    assert p.returncode == 1
    with pytest.raises(udelta.UdeltaError) as e:
        udelta.inspect(junk)
    assert str(e.value) in p.stderr


def test_a_copy_of_the_base_elsewhere_is_accepted(tmp_path, two_models):
    base = tmp_path / "base-copy"
    shutil.copytree(two_models.base, base)
    state = udelta.load_state_dict(base, two_models.udelta[0], framework="np")
    assert set(state) == set(read_safetensors(two_models.restored[0]))
