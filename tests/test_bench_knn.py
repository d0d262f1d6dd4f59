"""The k-NN benchmark: streamed backends and one-shot references side by side, one row per backend."""

from dino_sparo.evaluation.bench_knn import DEFAULT_BACKENDS, ONE_SHOT, format_table, run_bench
from dino_sparo.evaluation.knn_search import available_backends


def test_bench_rows_hold_every_backend_with_the_same_neighbours_and_a_ratio_to_the_one_shot(tmp_path):
    backends = [b for b in DEFAULT_BACKENDS if b in ONE_SHOT or b in available_backends()]
    rows = run_bench([16], backends, num_train=600, num_test=50, num_classes=4, k=10, temperature=0.07,
                     dtype="fp32", noise=1.0, threads=1, seed=0, folder=str(tmp_path), repeats=2)
    assert [r["backend"] for r in rows] == backends
    fastest = min(r["seconds_median"] for r in rows if r["one_shot"])
    for row in rows:
        assert row["one_shot"] == (row["backend"] in ONE_SHOT)
        assert len(row["seconds_all"]) == 2 and row["seconds"] == min(row["seconds_all"]) <= row["seconds_median"]
        assert row["vs_one_shot"] == round(row["seconds_median"] / fastest, 3)
        assert row["cpu_seconds_median"] > 0 and row["cpu_vs_one_shot"] > 0
        assert row[f"same_neighbours_as_{backends[0]}"] == 1.0  # exact search, clustered data: no ties
        assert 0.25 < row["top1"] <= 1.0  # the clusters give the vote signal (chance: 0.25)
    table = format_table(rows)
    assert all(b in table for b in backends) and "÷ one-shot" in table


def test_a_backend_that_cannot_run_here_keeps_the_measured_rows(tmp_path):
    """faiss-gpu on a machine without a GPU (or without faiss): its row says why, the others are measured."""
    missing = next(b for b in ("faiss-gpu", "faiss-cpu") if b not in available_backends())
    rows = run_bench([16], [missing, "torch", "torch-oneshot"], num_train=300, num_test=30, num_classes=3, k=5,
                     temperature=0.07, dtype="fp32", noise=1.0, threads=1, seed=0, folder=str(tmp_path))
    assert [r["backend"] for r in rows] == [missing, "torch", "torch-oneshot"]
    assert "error" in rows[0] and "available" in rows[0]["error"]
    for row in rows[1:]:  # compared with the first backend that ran
        assert "error" not in row and row["same_neighbours_as_torch"] == 1.0 and row["vs_one_shot"] > 0
    assert "not measured" in format_table(rows)
