"""Token clusters across depth (anyformer/training/clusters.py) and the interacting-particle
model (anyformer/nn/attention/particle.py): the statistics against naive numpy/scipy
computations, one layer against the paper's update written out, and the properties of
Geshkovski et al. (2023) on small random inputs: collapse to one cluster for d >= 3,
metastable clusters at large beta, an energy that the unnormalized dynamics never lower, and
repulsion with V = -I. Then `anyformer inspect clusters` on runs, configs and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from anyformer import build_model
from anyformer.cli import main
from anyformer.config import ModelConfig
from anyformer.training.clusters import cluster_report, cosine_similarities, count_clusters, depth_states, interaction_energy
from tests.helpers import REPO


def particles(beta: float = 1.0, dim: int = 3, loops: int = 100, *, step: float = 0.1, normalization: str = "softmax",
              value: int = 1, seed: int = 0) -> torch.nn.Module:
    """The paper's dynamics as an anyformer model (configs/theory/particles.yaml's layout)."""
    cfg = ModelConfig(
        arch="encoder", vocab_size=256, dim=dim, num_layers=1, max_seq_len=512, positional={"kind": "none"},
        attention={"kind": "particle", "num_heads": 1, "kernel": "eager",
                   "options": {"beta": beta, "step": step, "normalization": normalization, "value": value}},
        norm={"kind": "rmsnorm", "placement": "post", "eps": 1e-12}, ffn={"kind": "none"}, depth={"kind": "looped", "options": {"loops": loops}},
        embed_norm=True, final_norm=False, tie_embeddings=False, init_std=1.0, head={"kind": "none"})
    torch.manual_seed(seed)
    return build_model(cfg)


def trajectory(model: torch.nn.Module, n: int) -> list[torch.Tensor]:
    return depth_states(model, (torch.arange(n)[None],))


# --------------------------------------------------------------------------- the statistics


def test_similarities_clusters_and_energy_against_numpy_and_scipy() -> None:
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import connected_components

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 6))
    h = np.concatenate([c + 0.05 * rng.normal(size=(5, 6)) for c in centres])  # 4 tight groups of 5
    h = h[rng.permutation(len(h))]
    unit = h / np.linalg.norm(h, axis=1, keepdims=True)
    sim = cosine_similarities(torch.tensor(h, dtype=torch.float32))
    assert np.allclose(sim.numpy(), unit @ unit.T, atol=1e-6)
    for tau in (-1.0, 0.0, 0.5, 0.9, 0.99, 0.999999):
        expected = connected_components(csr_matrix(unit @ unit.T >= tau), directed=False)[0]
        assert count_clusters(torch.tensor(unit @ unit.T), tau) == expected, tau
    assert count_clusters(torch.tensor(unit @ unit.T), 0.98) == 4
    beta = 2.5
    naive = sum(np.exp(beta * unit[i] @ unit[j]) for i in range(len(h)) for j in range(len(h))) / (2 * beta * len(h) ** 2)
    assert interaction_energy(torch.tensor(unit @ unit.T), beta) == pytest.approx(naive, rel=1e-12)
    # a chain links what no single pair would: single linkage
    chain = torch.tensor([[1.0, 0.96, 0.9], [0.96, 1.0, 0.96], [0.9, 0.96, 1.0]])
    assert count_clusters(chain, 0.95) == 1 and count_clusters(chain, 0.97) == 3


@pytest.mark.parametrize("normalization, value", [("softmax", 1), ("usa", 1), ("softmax", -1)])
def test_one_layer_is_the_papers_step_written_out(normalization: str, value: int) -> None:
    beta, step, n, d = 2.0, 0.3, 7, 4
    model = particles(beta, d, loops=3, step=step, normalization=normalization, value=value)
    states = [s.double().numpy() / np.sqrt(d) for s in trajectory(model, n)]  # RMSNorm's sphere has radius sqrt(d)
    x = states[0]
    assert np.allclose(np.linalg.norm(x, axis=1), 1.0)  # the embeddings start on the sphere
    for t in range(3):
        w = np.exp(beta * x @ x.T)
        w = w / w.sum(1, keepdims=True) if normalization == "softmax" else w / n
        moved = x + step * value * (w @ x)
        x = moved / np.linalg.norm(moved, axis=1, keepdims=True)
        assert np.allclose(states[t + 1], x, atol=1e-5), t


# --------------------------------------------------------------------------- the paper's properties


@pytest.mark.parametrize("dim, seed", [(3, 0), (3, 1), (5, 2), (8, 3)])
def test_tokens_collapse_to_one_cluster_for_d_at_least_3(dim: int, seed: int) -> None:
    report = cluster_report(trajectory(particles(1.0, dim, loops=400, seed=seed), 12), threshold=0.9999, beta=1.0)
    assert report[0]["clusters"] > 6 and report[-1]["clusters"] == 1
    assert report[-1]["min_similarity"] > 0.9999
    assert report[-1]["energy"] == pytest.approx(np.exp(1.0) / 2, rel=1e-4)  # every token in one point


def test_large_beta_keeps_several_clusters_for_long_before_they_merge() -> None:
    """At beta = 1, 16 tokens on S^2 are one cluster within 100 steps; at beta = 9 the same
    tokens settle into a few tight clusters that persist for thousands of steps, and merge
    now and then (metastability)."""
    fast = [r["clusters"] for r in cluster_report(trajectory(particles(1.0, 3, loops=100, step=0.2), 16), threshold=0.999, beta=1.0)]
    assert fast[-1] == 1
    slow = [r["clusters"] for r in cluster_report(trajectory(particles(9.0, 3, loops=6000, step=0.2), 16), threshold=0.999, beta=9.0)]
    assert slow[100] >= 3 and slow[2000] >= 2
    longest, run = 0, 0
    for a, b in zip(slow, slow[1:]):
        run = run + 1 if a == b and a >= 2 else 0
        longest = max(longest, run)
    assert longest >= 1000  # several clusters, unchanged for a thousand steps and more
    assert slow[-1] < slow[500]  # ... and yet they merge
    assert all(a >= b for a, b in zip(slow, slow[1:]))  # clusters only ever merge


@pytest.mark.parametrize("beta", [0.5, 1.0, 4.0])
def test_the_unnormalized_dynamics_never_lower_the_energy(beta: float) -> None:
    report = cluster_report(trajectory(particles(beta, 4, loops=300, step=0.05, normalization="usa", seed=5), 10), threshold=0.99, beta=beta)
    energies = [r["energy"] for r in report]
    assert all(b >= a - 1e-9 for a, b in zip(energies, energies[1:]))
    assert energies[-1] > energies[0] * 1.05


def test_with_v_equal_minus_identity_tokens_spread_apart() -> None:
    """Start from a tight bunch (embeddings near one direction): repulsion lowers every
    similarity statistic and the energy, where attraction keeps them one cluster."""
    def bunched(value: int) -> list[dict]:
        model = particles(1.0, 3, loops=200, value=value, seed=7)
        with torch.no_grad():
            model.embed.tokens.weight.copy_(torch.tensor([1.0, 0.0, 0.0]) + 0.05 * torch.randn_like(model.embed.tokens.weight))
        return cluster_report(trajectory(model, 10), threshold=0.95, beta=1.0)

    repel, attract = bunched(-1), bunched(1)
    assert repel[0]["clusters"] == 1 and attract[-1]["clusters"] == 1
    assert repel[-1]["mean_similarity"] < repel[0]["mean_similarity"] - 0.5 and repel[-1]["clusters"] > 1
    assert repel[-1]["min_similarity"] < 0 and repel[-1]["energy"] < repel[0]["energy"]
    means = [r["mean_similarity"] for r in repel]
    assert all(b <= a + 1e-9 for a, b in zip(means, means[1:]))


# --------------------------------------------------------------------------- the command


def test_inspect_clusters_on_the_particle_config_writes_its_report(tmp_path: Path, capsys) -> None:
    out = tmp_path / "report"
    assert main(["inspect", "clusters", str(REPO / "configs" / "theory" / "particles.yaml"), "--prompt", "abcdefghij",
                 "--loops", "200", "--out", str(out)]) == 0
    report = json.loads((out / "clusters.json").read_text())
    assert len(report["depths"]) == 201 and report["tokens"] == 10 and report["width"] == 3
    assert report["depths"][0]["clusters"] > 1 and report["depths"][-1]["clusters"] == 1
    assert (out / "similarity.png").stat().st_size > 1000 and (out / "clusters.png").stat().st_size > 1000
    assert "depth  clusters" in capsys.readouterr().out
    assert main(["inspect", "clusters", str(REPO / "configs" / "theory" / "particles.yaml"), "--prompt", "abcdefghij",
                 "--loops", "120", "--every", "50", "--attention.options.beta=4", "--out", str(out)]) == 0
    report = json.loads((out / "clusters.json").read_text())
    assert [r["depth"] for r in report["depths"]] == [0, 50, 100, 120] and "beta=4" in report["title"]


def test_inspect_clusters_on_a_trained_run_follows_every_layer(learned_run, tmp_path: Path, capsys) -> None:
    from anyformer.training.run import load_run

    out = tmp_path / "run_report"
    assert main(["inspect", "clusters", str(learned_run.dir), "--prompt", "ROMEO: what light", "--out", str(out)]) == 0
    report = json.loads((out / "clusters.json").read_text())
    r = load_run(learned_run.dir, device="cpu")
    assert len(report["depths"]) == r.cfg.model.num_layers + 1 and report["labels"][:2] == ["R", "O"]
    ids = torch.tensor([r.tokenizer.encode("ROMEO: what light")])
    last = r.model.stack.blocks[-1]
    seen = []
    handle = last.register_forward_hook(lambda _m, _a, o: seen.append(o[0]))
    with torch.no_grad():
        r.model.eval()(ids)
    handle.remove()
    assert report["depths"][-1]["mean_similarity"] == pytest.approx(
        float(cosine_similarities(seen[0])[~torch.eye(ids.shape[1], dtype=torch.bool)].mean()), abs=1e-6)


def test_inspect_clusters_refuses_bad_input_in_one_line(learned_run, tmp_path: Path, capsys) -> None:
    small_vocab = tmp_path / "small_vocab.yaml"
    small_vocab.write_text((REPO / "configs" / "theory" / "particles.yaml").read_text().replace("vocab_size: 256", "vocab_size: 100"))
    megabyte = tmp_path / "megabyte.yaml"
    megabyte.write_text("arch: megabyte\nvocab_size: 256\ndim: 32\nnum_layers: 1\nmax_seq_len: 64\nattention: {num_heads: 2}\n")
    cases = [
        (["inspect", "clusters", str(learned_run.dir), "--prompt", "x" * 100], "this model reads at most 32"),
        (["inspect", "clusters", str(learned_run.dir), "--prompt", "hi", "--loops", "5"], "--loops applies to a looped model"),
        (["inspect", "clusters", str(learned_run.dir)], "give the input to follow"),
        (["inspect", "clusters", str(learned_run.dir), "--prompt", "hi", "--threshold", "2"], "--threshold is a cosine similarity"),
        (["inspect", "clusters", str(learned_run.dir), "--prompt", "hi", "--beta", "0"], "--beta must be positive"),
        (["inspect", "clusters", str(megabyte), "--prompt", "hello"], "block stacks"),
        (["inspect", "clusters", str(small_vocab), "--prompt", "caf\u00e9"], "past the model's vocabulary of 100"),
        (["inspect", "clusters", str(learned_run.dir), "--prompt", "hi", "--model.dim=8"], "apply to a model config YAML target"),
    ]
    for argv, message in cases:
        assert main([*argv, "--out", str(tmp_path / "never")]) == 2, argv
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, (argv, err)
    assert not (tmp_path / "never").exists()
