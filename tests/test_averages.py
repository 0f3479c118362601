"""Averages over data subsets, models and checkpoints, against dense torch.func oracles."""

import copy
import dataclasses

import pytest
import torch
from torch import nn

import curvops
from curvops import GGN, Dense, EmpiricalFisher, GradientCovariance, Hessian, Identity
from curvops.analysis.averages import across_checkpoints, across_models, average, per_subset
from curvops.testing import contract, oracles
from curvops.testing.zoo import CASES, linear_mse_hessian

D = torch.float64


def sub_problem(problem, idx):
    """The same problem on the samples ``idx`` only."""
    return dataclasses.replace(problem, X=problem.slice_inputs(idx), y=problem.y[idx])


def at_state(problem, state):
    """The same problem with a deep copy of the model holding ``state``."""
    model = copy.deepcopy(problem.model)
    model.load_state_dict(state)
    return dataclasses.replace(problem, model=model)


def perturbed_states(model, count, scale=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = model.state_dict()
    return [{k: v + scale * (t + 1) * torch.randn(v.shape, generator=g, dtype=v.dtype) if v.is_floating_point() else v
             for k, v in base.items()} for t in range(count)]


class CountingFactory:
    """An operator factory that records how often it was called (to show errors come first)."""

    def __init__(self, cls=Hessian):
        self.cls, self.calls = cls, 0

    def __call__(self, model, loss, data, **kw):
        self.calls += 1
        return self.cls(model, loss, data, **kw)


# ---- per_subset ---------------------------------------------------------------------------
def test_per_class_operators_equal_dense_hessians_of_each_class():
    problem = CASES["mlp_ce"].build("mean")
    before = contract.snapshot(problem.model)
    ops = per_subset(Hessian, problem.model, problem.loss_arg(), problem.data, "classes", **problem.kwargs(batch_size=3))
    counts = torch.bincount(problem.y)
    assert list(ops) == [0, 1, 2] and all(isinstance(c, int) for c in ops)
    assert ops.sizes == {c: int(counts[c]) for c in range(3)}
    for c, H in ops.items():
        idx = torch.nonzero(problem.y == c).flatten()
        torch.testing.assert_close(ops.indices[c], idx)
        contract.assert_matches(H.to_dense(), oracles.hessian_dense(sub_problem(problem, idx)), what=f"class {c}")
    contract.assert_unchanged(before, contract.snapshot(problem.model))


@pytest.mark.parametrize("family", [Hessian, GGN, EmpiricalFisher, GradientCovariance, "ggn"], ids=str)
def test_count_weighted_average_of_classes_is_the_full_operator(family):
    problem = CASES["mlp_ce"].build("mean")
    ops = per_subset(family, problem.model, problem.loss_arg(), problem.data, "classes", **problem.kwargs())
    A = average(ops, weights=ops.sizes)
    cls = GGN if family == "ggn" else family
    full = problem.build(cls)
    contract.assert_matches(A.to_dense(), full.to_dense(), what="Σ n_c A_c / N")
    assert A.tags == full.tags  # every term shares the family's tags, and the weights are positive


def test_cluster_labels_and_dict_inputs_partition():
    problem = CASES["dict_mse"].build("mean")  # X is a dict of tensors
    labels = torch.arange(problem.N) % 3
    ops = per_subset("hessian", problem.model, problem.loss_arg(), problem.data, labels, **problem.kwargs())
    assert list(ops) == [0, 1, 2]
    for c, H in ops.items():
        contract.assert_matches(H.to_dense(), oracles.hessian_dense(sub_problem(problem, labels == c)))
    contract.assert_matches(average(ops, weights=ops.sizes).to_dense(), oracles.hessian_dense(problem))


def test_named_index_sets_masks_and_a_callable_factory():
    problem = CASES["linear_mse"].build("mean")
    mask = torch.zeros(problem.N, dtype=torch.bool)
    mask[[1, 4, 9, 15]] = True
    subsets = {"head": torch.arange(6), "mask": mask, "list": [2, 3, 11]}
    factory = CountingFactory(Hessian)
    ops = per_subset(factory, problem.model, problem.loss_arg(), problem.data, subsets, **problem.kwargs())
    assert factory.calls == 3 and list(ops) == ["head", "mask", "list"]
    assert ops.sizes == {"head": 6, "mask": 4, "list": 3}
    for name, idx in [("head", torch.arange(6)), ("mask", mask), ("list", torch.tensor([2, 3, 11]))]:
        want = linear_mse_hessian(sub_problem(problem, idx))  # closed form ∝ XᵀX on the subset
        contract.assert_matches(ops[name].to_dense(), want, what=name)


def test_sum_reduction_full_operator_is_the_plain_sum():
    problem = CASES["mlp_ce"].build("sum")
    ops = per_subset(Hessian, problem.model, problem.loss_arg(), problem.data, "classes", **problem.kwargs())
    A = len(ops) * average(ops)  # equal weights: Σ_c H_c / C
    contract.assert_matches(A.to_dense(), oracles.hessian_dense(problem))


def test_per_subset_errors_come_before_any_operator_is_built():
    problem = CASES["mlp_ce"].build("mean")
    model, loss, kw = problem.model, problem.loss_arg(), problem.kwargs()
    factory = CountingFactory()
    with pytest.raises(ValueError, match="subset 'b' is empty"):
        per_subset(factory, model, loss, problem.data, {"a": torch.arange(3), "b": torch.tensor([], dtype=torch.long)}, **kw)
    with pytest.raises(ValueError, match="subset 'm' is empty"):
        per_subset(factory, model, loss, problem.data, {"a": [0], "m": torch.zeros(problem.N, dtype=torch.bool)}, **kw)
    with pytest.raises(ValueError, match=r"expected indices in \[0, 16\)"):
        per_subset(factory, model, loss, problem.data, {"a": torch.tensor([0, 16])}, **kw)
    with pytest.raises(ValueError, match=r"boolean mask of shape \(16,\)"):
        per_subset(factory, model, loss, problem.data, {"a": torch.ones(5, dtype=torch.bool)}, **kw)
    with pytest.raises(ValueError, match=r"cluster labels of shape \(16,\)"):
        per_subset(factory, model, loss, problem.data, torch.zeros(15, dtype=torch.long), **kw)
    with pytest.raises(TypeError, match="integer tensor"):
        per_subset(factory, model, loss, problem.data, torch.zeros(16, dtype=D), **kw)
    with pytest.raises(TypeError, match=r"expected data as an \(X, y\) pair of tensors"):
        per_subset(factory, model, loss, problem.batches(4), "classes", **kw)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(problem.X, problem.y), batch_size=4)
    with pytest.raises(TypeError, match="got DataLoader"):
        per_subset(factory, model, loss, loader, "classes", **kw)
    with pytest.raises(ValueError, match="unknown|expected subsets='classes'"):
        per_subset(factory, model, loss, problem.data, "clusters", **kw)
    with pytest.raises(ValueError, match="operator name"):
        per_subset("hessain", model, loss, problem.data, "classes", **kw)
    with pytest.raises(TypeError, match="not a built operator"):
        per_subset(problem.build(Hessian), model, loss, problem.data, "classes", **kw)
    mse = CASES["linear_mse"].build("mean")
    with pytest.raises(ValueError, match="expected integer class labels y"):
        per_subset(factory, mse.model, mse.loss_arg(), mse.data, "classes", **mse.kwargs())
    assert factory.calls == 0


# ---- average -------------------------------------------------------------------------------
def test_average_of_dense_operators_and_tags():
    g = torch.Generator().manual_seed(1)
    mats = []
    for _ in range(3):
        B = torch.randn(5, 5, generator=g, dtype=D)
        mats.append(B @ B.T)
    ops = [Dense(M, tags=("psd",)) for M in mats]
    w = [1.0, 2.0, 5.0]
    A = average(ops, weights=w)
    want = sum(wi * M for wi, M in zip(w, mats)) / sum(w)
    contract.assert_matches(A.to_dense(), want)
    contract.check_products(A, want)
    assert A.tags == {"symmetric", "psd"}
    mixed = average([ops[0], Dense(-mats[1], tags=("symmetric",))], weights=torch.tensor([3.0, 1.0]))
    contract.assert_matches(mixed.to_dense(), (3 * mats[0] - mats[1]) / 4)
    assert mixed.tags == {"symmetric"}
    assert average([ops[0], Dense(mats[1])]).tags == frozenset()
    contract.assert_matches(average({"a": ops[0], "b": 2 * Identity(5)}, weights={"b": 3, "a": 1}).to_dense(),
                            (mats[0] + 6 * torch.eye(5, dtype=D)) / 4)
    contract.assert_matches(average([ops[1]]).to_dense(), mats[1])


def test_average_errors():
    A, B = Dense(torch.eye(3, dtype=D)), Dense(torch.eye(4, dtype=D))
    with pytest.raises(ValueError, match="expected operators of one shape"):
        average([A, B])
    with pytest.raises(ValueError, match="finite positive weights"):
        average([A, A], weights=[1.0, -1.0])
    with pytest.raises(ValueError, match="finite positive weights"):
        average([A, A], weights=[1.0, 0.0])
    with pytest.raises(ValueError, match="expected 2 weights"):
        average([A, A], weights=[1.0])
    with pytest.raises(ValueError, match="weights keys do not match"):
        average({"a": A, "b": A}, weights={"a": 1.0, "c": 1.0})
    with pytest.raises(ValueError, match="at least one operator"):
        average([])
    with pytest.raises(TypeError, match="operator 1 is a str"):
        average([A, "B"])
    with pytest.raises(TypeError, match="one dtype"):
        average([A, Dense(torch.eye(3, dtype=torch.float32))])
    with pytest.raises(TypeError, match="sequence or dict of operators"):
        average(A)
    problem = CASES["dict_mse"].build("mean")  # b.weight and head.weight both have 8 entries
    H1, H2 = (problem.build(Hessian, params=[name]) for name in ("b.weight", "head.weight"))
    assert H1.shape == H2.shape
    with pytest.raises(ValueError, match="different parameter sets"):
        average([H1, H2])


# ---- across models and checkpoints ---------------------------------------------------------------
def test_across_models_matches_dense_average_and_leaves_models_untouched():
    problem = CASES["mlp_ce"].build("mean")
    models = [copy.deepcopy(problem.model) for _ in range(3)]
    for m, state in zip(models, perturbed_states(problem.model, 3)):
        m.load_state_dict(state)
    befores = [contract.snapshot(m) for m in models]
    w = [1.0, 2.0, 3.0]
    A = across_models(Hessian, models, problem.loss_arg(), problem.data, weights=w, **problem.kwargs())
    dense = [oracles.hessian_dense(dataclasses.replace(problem, model=m)) for m in models]
    want = sum(wi * H for wi, H in zip(w, dense)) / sum(w)
    assert not torch.allclose(dense[0], dense[2], rtol=1e-3)  # the models really differ
    contract.assert_matches(A.to_dense(), want)
    contract.exercise(A)
    for m, before in zip(models, befores):
        contract.assert_unchanged(before, contract.snapshot(m))


def test_across_models_errors():
    problem = CASES["mlp_ce"].build("mean")
    other = nn.Sequential(nn.Linear(4, 7), nn.Tanh(), nn.Linear(7, 3)).to(D)
    factory = CountingFactory()
    with pytest.raises(ValueError, match="parameter names and shapes of model 0"):
        across_models(factory, [problem.model, other], problem.loss_arg(), problem.data)
    with pytest.raises(TypeError, match="model 1 is a OrderedDict; expected an nn.Module"):
        across_models(factory, [problem.model, problem.model.state_dict()], problem.loss_arg(), problem.data)
    with pytest.raises(ValueError, match="finite positive weights"):
        across_models(factory, [problem.model, problem.model], problem.loss_arg(), problem.data, weights=[1, 0])
    with pytest.raises(ValueError, match="at least one model"):
        across_models(factory, [], problem.loss_arg(), problem.data)
    frozen = copy.deepcopy(problem.model)
    frozen[0].bias.requires_grad_(False)  # same architecture, different trainable parameters
    with pytest.raises(ValueError, match="over different parameters"):
        across_models(Hessian, [problem.model, frozen], problem.loss_arg(), problem.data)
    assert factory.calls == 0


def test_across_checkpoints_state_dicts_and_files_with_buffers(tmp_path):
    problem = CASES["bn_eval_mse"].build("mean")  # BatchNorm in eval mode: buffers come from the checkpoint
    states = perturbed_states(problem.model, 3, scale=0.2)
    for s in states:
        s["1.running_var"] = s["1.running_var"].abs() + 0.5
    path = tmp_path / "ckpt1.pt"
    torch.save(states[1], path)
    before = contract.snapshot(problem.model)
    w = [2.0, 1.0, 1.0]
    A = across_checkpoints(GGN, problem.model, [states[0], str(path), states[2]], problem.loss_arg(), problem.data,
                           weights=w, **problem.kwargs(batch_size=4))
    dense = [oracles.ggn_dense(at_state(problem, s)) for s in states]
    want = sum(wi * G for wi, G in zip(w, dense)) / sum(w)
    contract.assert_matches(A.to_dense(), want)
    assert A.is_psd
    contract.assert_unchanged(before, contract.snapshot(problem.model))
    # a pathlib.Path works as well, and modules of the architecture count as checkpoints
    twin = copy.deepcopy(problem.model)
    twin.load_state_dict(states[2])
    B = across_checkpoints("ggn", problem.model, [path, twin], problem.loss_arg(), problem.data, **problem.kwargs())
    contract.assert_matches(B.to_dense(), (dense[1] + dense[2]) / 2)


def test_across_checkpoints_errors_before_any_work(tmp_path):
    problem = CASES["mlp_ce"].build("mean")
    model, loss, data = problem.model, problem.loss_arg(), problem.data
    good = perturbed_states(model, 1)[0]
    missing = {k: v for k, v in good.items() if k != "2.bias"}
    unexpected = {**good, "3.weight": torch.zeros(2, dtype=D)}
    wrong = {**good, "0.weight": torch.zeros(5, 4, dtype=D)}
    bad_file = tmp_path / "wrong.pt"
    torch.save(wrong, bad_file)
    pickled = tmp_path / "pickled.pt"
    torch.save(model, pickled)  # a whole pickled model: not loadable with weights_only=True
    wrapped = tmp_path / "wrapped.pt"
    torch.save({"model": good, "step": 3}, wrapped)
    before = contract.snapshot(model)
    factory = CountingFactory()
    cases = [
        ([good, missing], ValueError, r"checkpoint 1 does not match.*missing keys \['2.bias'\]"),
        ([good, unexpected], ValueError, r"unexpected keys \['3.weight'\]"),
        ([good, wrong], ValueError, r"checkpoint 1 has tensors of the wrong shape: \['0.weight: \(5, 4\) vs model \(6, 4\)'\]"),
        ([good, str(bad_file)], ValueError, r"checkpoint 1 \('.*wrong.pt'\) has tensors of the wrong shape"),
        ([good, tmp_path / "nope.pt"], ValueError, "no such file"),
        ([good, pickled], ValueError, r"could not load checkpoint 1 .*weights_only=True.*model.state_dict\(\)"),
        ([good, wrapped], TypeError, r"not tensors \(\['model', 'step'\]\).*ckpt\['model'\]"),
        ([good, 3], TypeError, "checkpoint 1 as a state dict"),
        (good, TypeError, "Wrap a single one in a list"),
        ([], ValueError, "at least one checkpoint"),
    ]
    for checkpoints, err, match in cases:
        with pytest.raises(err, match=match):
            across_checkpoints(factory, model, checkpoints, loss, data)
    with pytest.raises(ValueError, match="expected 2 weights"):
        across_checkpoints(factory, model, [good, good], loss, data, weights=[1.0])
    with pytest.raises(TypeError, match="expected the model as an nn.Module"):
        across_checkpoints(factory, oracles.forward, [good], loss, data)
    assert factory.calls == 0
    contract.assert_unchanged(before, contract.snapshot(model))


def test_across_checkpoints_eigenvalues_of_the_average():
    """A spectral check through the linear algebra: eigsh on the lazy average equals dense eigvalsh."""
    problem = CASES["mlp_ce"].build("mean")
    states = perturbed_states(problem.model, 2, scale=0.1)
    A = across_checkpoints(Hessian, problem.model, states, problem.loss_arg(), problem.data)
    want = (oracles.hessian_dense(at_state(problem, states[0])) + oracles.hessian_dense(at_state(problem, states[1]))) / 2
    res = curvops.eigsh(A, k=3, tol=1e-10, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(res.eigenvalues, torch.linalg.eigvalsh(want)[-3:], rtol=1e-8, atol=1e-10)
