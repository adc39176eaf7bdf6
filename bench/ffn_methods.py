"""FFN neuron scorers alone on all-MiniLM-L6-v2 / BBC News: 30 % of the FFN neurons removed by each
scorer's global ranking, mean embedding cosine to dense on the 422 bbc-news:test articles before and
after repair (256 calibration articles, seed 0). The evidence behind shrink's default ``--ffn-method``.

    python bench/ffn_methods.py
"""
import copy, time, torch
from transformers import AutoTokenizer
import headslim
from headslim.data import batches, load_texts, sample
from headslim.quality import embeddings, embedding_cosine
from headslim.scoring.neurons import score_structures
from headslim.selection import select_neurons
from headslim.plan import PrunePlan
from headslim.surgery import prune_heads
from headslim.repair import repair
torch.set_num_threads(2)
from headslim.io import bundled_model_dir
src = bundled_model_dir()
dense = headslim.load_model(src); tok = AutoTokenizer.from_pretrained(str(src))
calib = list(batches(sample(load_texts("bbc-news:train"), 256, 0), tok, batch_size=16, max_length=128))
test = list(batches(load_texts("bbc-news:test"), tok, batch_size=64, max_length=128))
ref = embeddings(dense, test)
heads, widths = [12]*6, [1536]*6
for method in ["fisher", "gradient", "magnitude"]:
    t = time.time(); sc = score_structures(dense, calib, method=method, progress=False)["mlp"]; st = time.time() - t
    kept = select_neurons(sc, widths, prune=0.3)
    plan = PrunePlan(heads, [list(range(12))]*6, num_neurons=widths, kept_neurons=kept)
    m = prune_heads(copy.deepcopy(dense), plan)
    c0 = embedding_cosine(ref, embeddings(m, test))["mean_cosine"]
    repair(m, dense, plan, calib, progress=False)
    c1 = embedding_cosine(ref, embeddings(m, test))["mean_cosine"]
    print(f"{method:>9}: 30 % FFN neurons, per layer {[len(k) for k in kept]}: cos {c0:.4f} -> repaired {c1:.4f} (score {st:.0f} s)", flush=True)
