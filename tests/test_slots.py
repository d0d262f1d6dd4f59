"""SPARO slot evaluation: slot subsets, per-slot k-NN, greedy selection on the train split."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dino_sparo.evaluation.knn_search import knn_classify, knn_accuracy, knn_search
from dino_sparo.evaluation.slots import (
    SelectedSlots,
    greedy_slot_selection,
    per_slot_knn,
    plot_per_slot_accuracy,
    select_slot_features,
    stratified_split,
)

L, V, C = 8, 8, 5
INFORMATIVE = [1, 4, 6]


def cont_const(raw: torch.Tensor) -> torch.Tensor:
    """Reference cont:const embedding: every slot unit-norm times sqrt(1/L), flattened slot-major."""
    num_slots = raw.shape[1]
    return (raw / raw.norm(dim=-1, keepdim=True) * (1.0 / num_slots) ** 0.5).reshape(raw.shape[0], -1)


def slot_data(n=1500, seed=0, signal=0.4):
    """Embeddings whose INFORMATIVE slots are noisy class prototypes and whose other slots are noise."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, C, (n,), generator=g)
    raw = torch.randn(n, L, V, generator=g)  # B × L × V
    prototypes = torch.randn(C, L, V, generator=g)
    raw[:, INFORMATIVE] = signal * prototypes[labels][:, INFORMATIVE] + 0.8 * raw[:, INFORMATIVE]
    return cont_const(raw), labels


# --------------------------------------------------------------------------- slot subsets


def test_select_slot_features_renormalises_to_the_reference():
    emb = cont_const(torch.randn(10, L, V))
    keep = [6, 1, 3]
    out = select_slot_features(emb, L, V, keep)
    reference = emb.view(10, L, V)[:, keep].reshape(10, -1) * (L / len(keep)) ** 0.5
    torch.testing.assert_close(out, reference)
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(10))
    # cosine of the subset = mean of the kept slots' cosines
    a, b = emb.view(10, L, V)[0], emb.view(10, L, V)[1]
    per_slot = F.cosine_similarity(a[keep], b[keep], dim=-1)
    assert float(out[0] @ out[1]) == pytest.approx(float(per_slot.mean()), abs=1e-6)


def test_select_slot_features_numpy_fp16_and_other_norms():
    emb = cont_const(torch.randn(6, L, V))
    out = select_slot_features(emb.numpy().astype(np.float16), L, V, [0, 2])
    assert isinstance(out, np.ndarray) and out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(out, select_slot_features(emb, L, V, [0, 2]).numpy(), atol=2e-3)
    raw = torch.randn(6, L * V)
    other = select_slot_features(raw, L, V, [5, 7], norm="cont:norm")
    torch.testing.assert_close(other, F.normalize(raw.view(6, L, V)[:, [5, 7]].reshape(6, -1), dim=-1))


def test_select_slot_features_names_bad_arguments():
    emb = torch.randn(4, L * V)
    with pytest.raises(ValueError, match="distinct ids"):
        select_slot_features(emb, L, V, [1, 1])
    with pytest.raises(ValueError, match="distinct ids"):
        select_slot_features(emb, L, V, [L])
    with pytest.raises(ValueError, match="num_slots=4"):
        select_slot_features(emb, 4, V, [0])
    with pytest.raises(ValueError, match="norm"):
        select_slot_features(emb, L, V, [0], norm="bogus")


def test_selected_slots_view_streams_a_memmap(tmp_path):
    emb, _ = slot_data(n=300)
    mm = np.lib.format.open_memmap(tmp_path / "f.npy", mode="w+", dtype=np.float16, shape=tuple(emb.shape))
    mm[:] = emb.numpy()
    mm.flush()
    stored = np.load(tmp_path / "f.npy", mmap_mode="r")
    view = SelectedSlots(stored, L, V, INFORMATIVE)
    eager = select_slot_features(stored, L, V, INFORMATIVE)
    assert view.shape == eager.shape
    lazy_sims, lazy_idx = knn_search(view, eager[:50], 10, backend="torch", chunk_size=37)
    sims, idx = knn_search(eager, eager[:50], 10, backend="torch")
    assert (lazy_idx == idx).all()
    torch.testing.assert_close(lazy_sims, sims)


# --------------------------------------------------------------------------- per-slot k-NN


def test_per_slot_knn_equals_knn_on_each_slot():
    emb, labels = slot_data(n=700)
    train, test, y_train, y_test = emb[:600], emb[600:], labels[:600], labels[600:]
    acc = per_slot_knn(train, y_train, test, y_test, L, V, k=10, chunk_size=97, query_chunk_size=13)
    assert acc.shape == (L,)
    for slot in range(L):
        cols = slice(slot * V, (slot + 1) * V)
        scores = knn_classify(train[:, cols], y_train, test[:, cols], C, k=10, backend="torch")
        assert acc[slot] == pytest.approx(float((scores.argmax(1) == y_test).float().mean()))
    noise = [s for s in range(L) if s not in INFORMATIVE]
    assert acc[INFORMATIVE].min() > acc[noise].max()


# --------------------------------------------------------------------------- greedy selection


def test_stratified_split_is_deterministic_disjoint_and_stratified():
    labels = np.repeat(np.arange(4), [50, 30, 20, 1])
    fit, held = stratified_split(labels, 0.2, seed=3)
    fit2, held2 = stratified_split(labels, 0.2, seed=3)
    assert (fit == fit2).all() and (held == held2).all()
    assert not (held == stratified_split(labels, 0.2, seed=4)[1]).all()
    assert np.intersect1d(fit, held).size == 0
    assert np.array_equal(np.sort(np.concatenate([fit, held])), np.arange(labels.size))
    assert [int((labels[held] == c).sum()) for c in range(4)] == [10, 6, 4, 0]


def test_greedy_takes_only_train_data():
    params = list(inspect.signature(greedy_slot_selection).parameters)
    assert params[:2] == ["train_features", "train_labels"]
    assert not any("test" in p for p in params)
    emb, labels = slot_data(n=400)
    sel = greedy_slot_selection(emb, labels, L, V, val_fraction=0.25, seed=1, max_slots=2)
    again = greedy_slot_selection(emb, labels, L, V, val_fraction=0.25, seed=1, max_slots=2)
    assert np.array_equal(sel.heldout_indices, again.heldout_indices) and sel.selected == again.selected
    assert np.array_equal(sel.heldout_indices, stratified_split(labels.numpy(), 0.25, 1)[1])
    assert sel.heldout_indices.max() < 400 and len(sel.selected) == 2


def test_greedy_picks_the_informative_slots_and_beats_all_slots():
    emb, labels = slot_data(n=2000)
    train, y_train, test, y_test = emb[:1500], labels[:1500], emb[1500:], labels[1500:]
    sel = greedy_slot_selection(train, y_train, L, V, val_fraction=0.2, k=20)
    assert sorted(sel.selected[:3]) == INFORMATIVE
    assert all(b > a for a, b in zip(sel.curve, sel.curve[1:])), "each step must improve"
    assert sel.curve[-1] > sel.all_slots_accuracy
    noise = [s for s in range(L) if s not in INFORMATIVE]
    assert min(sel.per_slot_accuracy[s] for s in INFORMATIVE) > max(sel.per_slot_accuracy[s] for s in noise)
    # the choice made on train carries over to the (never seen) test set
    chosen = knn_accuracy(
        select_slot_features(train, L, V, sel.selected), y_train,
        select_slot_features(test, L, V, sel.selected), y_test, C, ks=(20,),
    )[20]["top1"]
    everything = knn_accuracy(train, y_train, test, y_test, C, ks=(20,))[20]["top1"]
    assert chosen > everything


def test_greedy_curve_equals_knn_on_the_selected_slots():
    emb, labels = slot_data(n=600, seed=2)
    sel = greedy_slot_selection(emb, labels, L, V, val_fraction=0.2, k=10, max_slots=3)
    fit, held = sel.fit_indices, sel.heldout_indices
    for size in range(1, len(sel.selected) + 1):
        keep = sel.selected[:size]
        res = knn_accuracy(
            select_slot_features(emb[fit], L, V, keep), labels[fit],
            select_slot_features(emb[held], L, V, keep), labels[held], C, ks=(10,), backend="torch",
        )
        assert sel.curve[size - 1] == pytest.approx(res[10]["top1"], abs=1e-9)
    everything = knn_accuracy(emb[fit], labels[fit], emb[held], labels[held], C, ks=(10,), backend="torch")
    assert sel.all_slots_accuracy == pytest.approx(everything[10]["top1"], abs=1e-9)


def test_greedy_streaming_equals_precomputed():
    emb, labels = slot_data(n=500, seed=3)
    pre = greedy_slot_selection(emb, labels, L, V, k=10)
    stream = greedy_slot_selection(emb, labels, L, V, k=10, memory_budget=0, query_chunk_size=17)
    assert (pre.method, stream.method) == ("precomputed", "streaming")
    assert pre.selected == stream.selected
    np.testing.assert_allclose(pre.curve, stream.curve)
    assert pre.all_slots_accuracy == pytest.approx(stream.all_slots_accuracy)


def test_plot_per_slot_accuracy_writes_png(tmp_path):
    path = plot_per_slot_accuracy(np.linspace(0.1, 0.8, L), tmp_path / "plots" / "slots.png", highlight=[1], reference=0.5)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_per_slot_chart_legend_names_each_colour_and_the_reference_line():
    from matplotlib.colors import to_rgba

    from dino_sparo.evaluation.slots import per_slot_figure

    acc = np.linspace(0.1, 0.8, L)
    fig = per_slot_figure(acc, highlight=[1, 4], reference=0.5, highlight_label="slots chosen",
                          reference_label="all slots together")
    ax = fig.axes[0]
    bars = {i: to_rgba(p.get_facecolor()) for i, p in enumerate(ax.patches)}
    legend = ax.get_legend()
    assert legend is not None
    labels = [t.get_text() for t in legend.get_texts()]
    assert labels == ["other slots, alone", "slots chosen, alone", "all slots together: 0.500"]
    handles = legend.legend_handles
    assert to_rgba(handles[0].get_facecolor()) == bars[0] != bars[1]  # each legend patch is its bars' colour
    assert to_rgba(handles[1].get_facecolor()) == bars[1] == bars[4]
    line = next(line for line in ax.get_lines() if line.get_label().startswith("all slots"))
    assert set(line.get_ydata()) == {0.5}
    plain = per_slot_figure(acc).axes[0].get_legend()  # nothing highlighted, no reference: one entry
    assert [t.get_text() for t in plain.get_texts()] == ["slot alone"]
