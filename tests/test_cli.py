"""The CLI end to end on the real all-MiniLM-L6-v2, and every bad input: one line, exit 2, no output."""

import json
import shutil
import subprocess
import sys

import pytest
import torch

import headslim
from headslim.cli import main
from headslim.gates import gated
from headslim.plan import PLAN_FILE, PrunePlan
from tests.conftest import tiny_model

SMALL = ["--calib-samples", "24", "--eval-samples", "16", "--max-length", "64", "--no-progress"]


@pytest.fixture(scope="module")
def shrunk(tmp_path_factory, minilm_dir):
    """``headslim shrink`` run once as a user would, through the console script."""
    out = tmp_path_factory.mktemp("cli") / "slim"
    exe = shutil.which("headslim", path=str(__import__("pathlib").Path(sys.executable).parent))
    # gradient without repair: the exactness test below compares with the gated dense model
    proc = subprocess.run([exe, "shrink", str(minilm_dir), "--prune", "0.5", "--calib", "bbc-news",
                           "--method", "gradient", "--no-repair", "--out", str(out), *SMALL], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return out, proc.stdout


def test_shrink_writes_a_smaller_reloadable_checkpoint(shrunk, minilm_dir):
    out, stdout = shrunk
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", PLAN_FILE, "tokenizer.json", "modules.json", "1_Pooling"} <= names
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp dirs left
    assert (out / "model.safetensors").stat().st_size < (minilm_dir / "model.safetensors").stat().st_size
    plan = PrunePlan.load(out)
    assert sum(plan.heads_after) == 36 and min(plan.heads_after) >= 1
    prov = plan.provenance
    assert prov["method"] == "gradient" and prov["objective"] == "dense"
    assert prov["calibration"]["source"] == "bbc-news:train" and len(prov["calibration"]["sha256"]) == 64
    assert prov["headslim_version"] == headslim.__version__ and len(prov["scores"]) == 6
    assert "parameters: 22,713,216 ->" in stdout and "embedding cosine to dense" in stdout
    assert 0.0 < prov["quality"]["mean_cosine"] < 1.0


def test_pruned_real_model_equals_gated_dense(shrunk, minilm_dir):
    from transformers import AutoTokenizer

    out, _ = shrunk
    dense = headslim.load_model(minilm_dir)
    pruned = headslim.load_pruned(out)
    plan = PrunePlan.load(out)
    tok = AutoTokenizer.from_pretrained(str(out))
    enc = tok(["Pruned heads, same answers.", "A longer second sentence pads the first one out."],
              padding=True, return_tensors="pt")
    with torch.no_grad(), gated(dense, plan.mask()):
        expected = dense(**enc).last_hidden_state
    with torch.no_grad():
        got = pruned(**enc).last_hidden_state
    assert (got - expected).abs().max() <= 1e-5


def test_stock_loaders_read_it(shrunk):
    """AutoModel and SentenceTransformer rebuild the pruned shapes: on 4.x from ``config.pruned_heads``, and
    on any version from the config's ``headslim`` record once headslim is imported (this module imports it)."""
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel

    out, _ = shrunk
    stock = AutoModel.from_pretrained(str(out))
    assert [blk.attention.self.num_attention_heads for blk in stock.encoder.layer] == PrunePlan.load(out).heads_after
    emb = SentenceTransformer(str(out), device="cpu").encode(["hello world"])
    assert emb.shape == (1, 384)


def test_inspect(shrunk, capsys):
    out, _ = shrunk
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "heads per layer" in text and "(36 in all)" in text and "method gradient" in text


def test_shrink_with_text_file_and_random(tmp_path, minilm_dir, capsys):
    lines = [f"Sentence number {i} talks about topic {i % 3} at some length." for i in range(30)]
    (tmp_path / "texts.txt").write_text("\n".join(lines))
    rc = main(["shrink", str(minilm_dir), "--prune", "20", "--calib", str(tmp_path / "texts.txt"),
               "--method", "random", "--out", str(tmp_path / "slim"), "--json", *SMALL])
    assert rc == 0
    result = json.loads(capsys.readouterr().out)
    assert sum(result["heads_after"]) == 52
    assert result["quality"]["n"] == 6  # the last fifth of the file, held out from scoring
    assert result["plan"]["provenance"]["calibration"]["n_samples"] == 24


def test_hand_written_plan_with_zero_head_layer(tmp_path, minilm_dir, capsys):
    (tmp_path / "plan.json").write_text(json.dumps({"kept_heads": {"0": [], "3": [1, 5]}}))
    rc = main(["shrink", str(minilm_dir), "--plan", str(tmp_path / "plan.json"), "--out", str(tmp_path / "slim"),
               *SMALL])
    assert rc == 0, capsys.readouterr().err
    model = headslim.load_pruned(tmp_path / "slim")
    assert [blk.attention.self.num_attention_heads for blk in model.encoder.layer] == [0, 12, 12, 2, 12, 12]


# ---- bad input -------------------------------------------------------------------------------

def _expect_error(argv, match, capsys, out=None):
    capsys.readouterr()  # drop what the set-up printed
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.startswith("headslim: error: ") and len(err.splitlines()) == 1, err
    assert match in err, err
    if out is not None:
        assert not out.exists()
    return err


@pytest.fixture
def tiny_dir(tmp_path):
    tiny_model("bert", "BertModel").save_pretrained(tmp_path / "tiny")
    return tmp_path / "tiny"


def test_unknown_architecture(tmp_path, capsys):
    import transformers

    config = transformers.OPTConfig(num_hidden_layers=1, num_attention_heads=2, hidden_size=8, ffn_dim=16,
                                    word_embed_proj_dim=8, vocab_size=10)
    transformers.OPTModel(config).save_pretrained(tmp_path / "opt")
    from headslim.arch import supported_model_types

    supported = supported_model_types()  # every registered family, named in the message
    assert {"bert", "electra", "gpt2", "llama", "mistral", "qwen2", "qwen3", "roberta", "xlm-roberta"} <= set(supported)
    _expect_error(["shrink", str(tmp_path / "opt"), "--out", str(tmp_path / "o"), *SMALL],
                  f"unsupported architecture 'opt'; supported model types: {', '.join(supported)}",
                  capsys, tmp_path / "o")


@pytest.mark.parametrize("prune,match", [("1.5", "outside (0, 1)"), ("0", "head count >= 1"),
                                         ("0.0", "outside (0, 1)"), ("100", "the model has 72 heads")])
def test_bad_prune_targets(tmp_path, minilm_dir, capsys, prune, match):
    _expect_error(["shrink", str(minilm_dir), "--prune", prune, "--out", str(tmp_path / "o"), *SMALL],
                  match, capsys, tmp_path / "o")


@pytest.mark.parametrize("plan,match", [({"kept_heads": {"0": [12]}}, "layer 0 keeps head 12"),
                                        ({"kept_heads": {"6": [0]}}, "layer 6 does not exist")])
def test_bad_hand_written_plan(tmp_path, minilm_dir, capsys, plan, match):
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    _expect_error(["shrink", str(minilm_dir), "--plan", str(tmp_path / "plan.json"), "--out", str(tmp_path / "o"),
                   *SMALL], match, capsys, tmp_path / "o")


def test_missing_and_corrupt_weights(tmp_path, tiny_dir, capsys):
    (tiny_dir / "model.safetensors").write_bytes(b"garbage" * 10)
    _expect_error(["shrink", str(tiny_dir), "--out", str(tmp_path / "o"), *SMALL], "is corrupt", capsys, tmp_path / "o")
    (tiny_dir / "model.safetensors").unlink()
    _expect_error(["shrink", str(tiny_dir), "--out", str(tmp_path / "o"), *SMALL], "no model weights", capsys,
                  tmp_path / "o")


def test_pickle_weights_refused_without_flag(tmp_path, tiny_dir, capsys):
    from safetensors.torch import load_file

    torch.save(load_file(tiny_dir / "model.safetensors"), tiny_dir / "pytorch_model.bin")
    (tiny_dir / "model.safetensors").unlink()
    _expect_error(["shrink", str(tiny_dir), "--out", str(tmp_path / "o"), *SMALL], "--allow-pickle", capsys,
                  tmp_path / "o")


def test_output_dir_rules(tmp_path, minilm_dir, capsys):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "keep.txt").write_text("mine")
    _expect_error(["shrink", str(minilm_dir), "--out", str(tmp_path / "o"), *SMALL], "pass --overwrite", capsys)
    assert (tmp_path / "o" / "keep.txt").read_text() == "mine"
    _expect_error(["shrink", str(minilm_dir), "--out", str(minilm_dir / "slim"), "--overwrite", *SMALL],
                  "inside the input", capsys, minilm_dir / "slim")


def test_empty_calibration_data(tmp_path, minilm_dir, capsys):
    (tmp_path / "empty.txt").write_text("\n \n")
    _expect_error(["shrink", str(minilm_dir), "--calib", str(tmp_path / "empty.txt"), "--out", str(tmp_path / "o"),
                   *SMALL], "is empty", capsys, tmp_path / "o")


def test_failure_half_way_leaves_no_output(tmp_path, minilm_dir, monkeypatch):
    import headslim.io

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(headslim.io, "copy_sentence_transformers_files", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        main(["shrink", str(minilm_dir), "--out", str(tmp_path / "o"), *SMALL])
    assert list(tmp_path.iterdir()) == []


def test_import_is_cheap():
    code = "import sys, headslim, headslim.kernels; assert 'torch' not in sys.modules and 'triton' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# ---- decoders through the same command ---------------------------------------------------------

@pytest.fixture
def tiny_llama_dir(tmp_path, minilm_dir):
    """A random-initialised GQA Llama (4 query heads over 2 KV heads) with MiniLM's tokenizer."""
    import transformers

    config = transformers.LlamaConfig(vocab_size=30522, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    config.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "llama")
    transformers.AutoTokenizer.from_pretrained(str(minilm_dir)).save_pretrained(tmp_path / "llama")
    lines = [f"The number {i} is followed by the number {i + 1} in this story." for i in range(40)]
    (tmp_path / "texts.txt").write_text("\n".join(lines))
    return tmp_path / "llama"


@pytest.mark.parametrize("gqa,method", [("uniform", "fisher"), ("uniform", "obs"), ("kv-groups", "obs"), ("ragged", "gradient")])
def test_shrink_a_gqa_decoder(tmp_path, tiny_llama_dir, capsys, gqa, method):
    rc = main(["shrink", str(tiny_llama_dir), "--prune", "4", "--gqa", gqa, "--method", method,
               "--calib", str(tmp_path / "texts.txt"), "--out", str(tmp_path / "slim"), *SMALL])
    out = capsys.readouterr().out
    assert rc == 0
    assert "perplexity on 8 held-out texts" in out and "repair: " in out and "repair: off" not in out
    plan = PrunePlan.load(tmp_path / "slim")
    repaired = plan.provenance["repair"]  # every layer that lost heads (but not all) was re-fitted
    lost = [i for i, (kept, n) in enumerate(zip(plan.kept_heads, plan.num_heads)) if 0 < len(kept) < n]
    assert repaired["requested"] and [e["layer"] for e in repaired["layers"]] == lost
    assert sum(plan.heads_after) == 4 and plan.provenance["gqa"] == gqa
    assert plan.kv_head_of_q == [[0, 0, 1, 1], [0, 0, 1, 1]]
    model = headslim.load_pruned(tmp_path / "slim")
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    assert model.generate(ids, max_new_tokens=3, do_sample=False).shape == (1, 8)
    if gqa == "kv-groups":  # whole KV heads go with their query heads
        assert all(len(kv) in (0, 1, 2) for kv in plan.kept_kv_heads)
        assert all(len(q) == 2 * len(kv) for q, kv in zip(plan.kept_heads, plan.kept_kv_heads))


def test_shrink_a_gqa_decoder_with_ffn_neurons(tmp_path, tiny_llama_dir, capsys):
    """Heads (uniform GQA) and FFN neurons of a decoder in one shrink: the plan keeps standard GQA
    shapes, records the FFN settings beside the GQA mode, the down projections are repaired too and
    the result generates after reload."""
    rc = main(["shrink", str(tiny_llama_dir), "--prune", "4", "--prune-ffn", "0.4", "--calib",
               str(tmp_path / "texts.txt"), "--out", str(tmp_path / "slim"), *SMALL])
    assert rc == 0, capsys.readouterr().err
    plan = PrunePlan.load(tmp_path / "slim")
    prov = plan.provenance
    assert prov["gqa"] == "uniform" and prov["ffn_method"] == "magnitude" and prov["prune_ffn"] == 0.4
    assert sum(plan.neurons_after) == round(0.6 * 2 * 37) and sum(plan.heads_after) == 4
    assert {e["kind"] for e in prov["repair"]["layers"]} <= {"attention", "mlp"}
    assert any(e["kind"] == "mlp" for e in prov["repair"]["layers"])
    model = headslim.load_pruned(tmp_path / "slim")
    assert model.generate(torch.tensor([[5, 6, 7, 8, 9]]), max_new_tokens=3, do_sample=False).shape == (1, 8)


def _options(command: str) -> set[str]:
    """The ``dest`` of every option of a sub-command."""
    from headslim.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return {a.dest for a in sub.choices[command]._actions} - {"help"}


def test_every_shrink_option_reaches_its_config_field():
    from dataclasses import fields

    from headslim.args import config_from_args
    from headslim.cli import build_parser
    from headslim.pipeline import ShrinkConfig

    # args -> config copies by name: an option without a field of its name would be dropped silently
    # --layerwise is read by the CLI itself: it routes the run to headslim.offload (tests/test_offload.py)
    # so is --work-dir, which only the layer-at-a-time path takes; --stream-memory is given in GiB and
    # converted to the field's bytes by the CLI (config_from_args(..., stream_memory=bytes))
    assert _options("shrink") - {"model", "out", "json", "layerwise", "work_dir", "prune_params"} \
        <= {f.name for f in fields(ShrinkConfig)}  # --prune-params: read by the CLI for --layerwise
    args = build_parser().parse_args(["shrink", "m", "--out", "o", "--prune", "7", "--gqa", "ragged", "--no-repair",
                                      "--no-progress", "--shapes", "1x64"])
    config = config_from_args(ShrinkConfig, args)
    assert (config.prune, config.gqa, config.repair, config.progress, config.shapes) == (7, "ragged", False, False,
                                                                                        "1x64")
