"""Learning-rate schedules (fastnn.schedules) and ``optimizer.lr``."""

import json
import math

import numpy as np
import pytest

import fastnn as fn
from fastnn import schedules as S
from conftest import DTYPES, assert_close

STEPS = np.arange(0, 400)


# ------------------------------------------------------------ formulas, step by step
# Each schedule against its formula written independently, vectorised over the steps.

def test_step_decay_every_step():
    sched = S.StepDecay(0.3, step_size=7, gamma=0.5)
    want = 0.3 * 0.5 ** np.floor(STEPS / 7)
    got = np.array([sched(int(t)) for t in STEPS])
    np.testing.assert_allclose(got, want, rtol=1e-15, atol=0)
    assert [sched(6), sched(7), sched(13), sched(14)] == [0.3, 0.15, 0.15, 0.075]


@pytest.mark.parametrize("staircase", [False, True])
def test_exponential_decay_every_step(staircase):
    sched = S.ExponentialDecay(0.1, decay_steps=25, decay_rate=0.9, staircase=staircase)
    exponent = np.floor(STEPS / 25) if staircase else STEPS / 25
    want = 0.1 * np.exp(exponent * np.log(0.9))
    got = np.array([sched(int(t)) for t in STEPS])
    np.testing.assert_allclose(got, want, rtol=1e-13, atol=0)
    assert sched(0) == 0.1 and math.isclose(sched(25), 0.09, rel_tol=1e-15)


@pytest.mark.parametrize("warmup", [(None, 0), (0.5, 40), (0.05, 1)])
@pytest.mark.parametrize("alpha", [0.0, 0.1])
def test_cosine_decay_with_warmup_every_step(warmup, alpha):
    target, w = warmup
    lr0, decay = 0.01, 300
    sched = S.CosineDecay(lr0, decay, alpha=alpha, warmup_target=target, warmup_steps=w)
    peak = lr0 if target is None else target
    t = STEPS.astype(np.float64)
    # a second formula: the cosine as sin^2, the warm-up as an interpolation
    s = np.clip(t - w, 0, decay)
    decayed = peak * (alpha + (1 - alpha) * np.sin(np.pi / 2 * (1 - s / decay)) ** 2)
    warm = np.interp(t, [0, max(w, 1)], [lr0, peak])
    want = np.where(t < w, warm, decayed)
    got = np.array([sched(int(k)) for k in STEPS])
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-17)
    assert got[0] == (lr0 if w else peak)
    assert math.isclose(sched(w), peak, rel_tol=1e-15)                  # the top
    assert math.isclose(sched(w + decay // 2), peak * (1 + alpha) / 2, rel_tol=1e-12)
    assert math.isclose(sched(w + decay), alpha * peak, abs_tol=1e-18)  # the floor...
    assert sched(w + decay + 1000) == sched(w + decay)                   # ...and it stays
    if w > 1:
        assert np.all(np.diff(got[:w + 1]) > 0)     # rises during the warm-up
    assert np.all(np.diff(got[w:]) <= 0)            # never rises afterwards


# ------------------------------------------------------------ optimizers with a schedule

def _quadratic_grads(dtype, steps, n=5, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(n).astype(dtype) for _ in range(steps)]


@pytest.mark.parametrize("dtype", DTYPES)
def test_sgd_with_a_schedule_equals_the_hand_loop(dtype):
    sched = S.CosineDecay(0.0, 20, warmup_target=0.2, warmup_steps=5)
    grads = _quadratic_grads(dtype, 30)
    p = np.ones(5, dtype)
    opt = fn.SGD(lr=sched)
    want = np.ones(5, np.float64)
    for t, g in enumerate(grads, start=1):
        assert opt.lr == sched(t - 1)              # the rate the next update uses
        opt.step([p], [g])
        want -= sched(t - 1) * g.astype(np.float64)   # the formula, in float64
        assert opt.iterations == t
    assert_close(p, want, dtype, reduction=30)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("make", [
    lambda lr: fn.SGD(lr, momentum=0.9, nesterov=True, weight_decay=1e-2),
    lambda lr: fn.Adam(lr, amsgrad=True),
    lambda lr: fn.AdamW(lr),
    lambda lr: fn.RMSprop(lr, momentum=0.5, centered=True),
], ids=["sgd-nesterov", "adam-amsgrad", "adamw", "rmsprop"])
def test_a_schedule_equals_setting_lr_before_each_step(dtype, make):
    """Scheduled updates are exactly those of the same optimizer whose
    constant ``lr`` is set to the formula before every step."""
    sched = S.ExponentialDecay(0.05, decay_steps=3, decay_rate=0.7)
    grads = _quadratic_grads(dtype, 12, seed=1)
    p1, p2 = np.ones(5, dtype), np.ones(5, dtype)
    a, b = make(sched), make(1.0)
    for t, g in enumerate(grads, start=1):
        b.lr = 0.05 * 0.7 ** ((t - 1) / 3)
        a.step([p1], [g])
        b.step([p2], [g])
        np.testing.assert_array_equal(p1, p2)
    assert a.lr_schedule is sched and b.lr_schedule is None


def test_adam_with_a_schedule_against_the_formula():
    sched = S.StepDecay(0.1, step_size=4, gamma=0.5)
    grads = _quadratic_grads(np.float64, 10, seed=2)
    p = np.linspace(-1, 1, 5)
    opt = fn.Adam(sched, betas=(0.9, 0.99), eps=1e-8)
    want, m, v = p.copy(), np.zeros(5), np.zeros(5)
    for t, g in enumerate(grads, start=1):
        opt.step([p], [g])
        m = 0.9 * m + 0.1 * g
        v = 0.99 * v + 0.01 * g * g
        lr = 0.1 * 0.5 ** ((t - 1) // 4)
        want -= lr / (1 - 0.9 ** t) * m / (np.sqrt(v / (1 - 0.99 ** t)) + 1e-8)
    assert_close(p, want, np.float64, reduction=10)


def test_lr_set_between_steps_takes_effect():
    p, g = np.zeros(3), np.ones(3)
    opt = fn.SGD(0.1)
    opt.step([p], [g])
    opt.lr = 0.01
    opt.step([p], [g])
    np.testing.assert_allclose(p, -0.11, rtol=1e-15)
    opt.lr = S.StepDecay(1.0, step_size=1, gamma=0.5)   # at step 2: 1.0 * 0.5**2
    assert opt.lr == 0.25
    opt.step([p], [g])
    np.testing.assert_allclose(p, -0.36, rtol=1e-15)
    opt.lr = 0.5                                        # a float replaces the schedule
    assert opt.lr_schedule is None and opt.lr == 0.5


# ------------------------------------------------------------ the model's cached step

def _mlp(seed=0, dtype="float64", lr=0.05):
    model = fn.Sequential([fn.Dense(6, "tanh"), fn.Dense(2)], input_dim=4, dtype=dtype,
                          seed=seed)
    model.compile("mse", fn.SGD(lr, momentum=0.9))
    return model


def _data(n=32, seed=3):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 4))
    return x, np.tanh(x[:, :2] * 1.5 - x[:, 2:])


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_model_fit_follows_the_schedule_step_by_step(dtype):
    """One fit under a schedule equals fitting batch by batch with ``lr`` set to
    the formula before each batch (the cached step reads the rate per step)."""
    x, y = _data()
    sched = S.CosineDecay(0.0, decay_steps=6, warmup_target=0.1, warmup_steps=3)
    a = _mlp(dtype=dtype, lr=sched)
    a.fit(x, y, epochs=3, batch_size=8, shuffle=False, verbose=0)   # 12 steps
    b = _mlp(dtype=dtype)
    for t in range(12):
        b.optimizer.lr = sched(t)
        start = (t % 4) * 8
        b.fit(x[start:start + 8], y[start:start + 8], epochs=1, batch_size=8, shuffle=False,
              verbose=0)
    assert a.optimizer.iterations == b.optimizer.iterations == 12
    np.testing.assert_array_equal(a.params, b.params)


def test_changing_lr_between_fits_rebuilds_nothing():
    x, y = _data()
    model = _mlp()
    model.fit(x, y, epochs=1, batch_size=32, shuffle=False, verbose=0)
    plan = model._plans[(True, 32)]
    step, state = plan.step, model.optimizer._states[0]
    buffers = {k: (a.ctypes.data, a) for k, a in state.items()}
    params = model.params
    # one more step at a new rate, by hand: buf = 0.9*buf + g; p -= lr*buf
    before = model.params.copy()
    buf = state["buf"].copy()
    model._loss_and_grad(x, y)
    grad = model.grads.copy()
    model.optimizer.lr = 0.2
    model.fit(x, y, epochs=1, batch_size=32, shuffle=False, verbose=0)
    np.testing.assert_allclose(model.params, before - 0.2 * (0.9 * buf + grad), rtol=1e-12,
                               atol=1e-14)
    assert plan.step is step and model.params is params
    assert model.optimizer._states[0] is state
    assert {k: a.ctypes.data for k, a in state.items()} == \
        {k: p for k, (p, _) in buffers.items()}


# ------------------------------------------------------------ save / config

@pytest.mark.parametrize("sched", [
    S.StepDecay(0.1, 5, 0.5), S.ExponentialDecay(0.1, 10, 0.96, staircase=True),
    S.CosineDecay(0.0, 100, alpha=0.01, warmup_target=0.1, warmup_steps=10),
    S.CosineDecay(0.1, 100),
], ids=repr)
def test_config_round_trip(sched):
    config = json.loads(json.dumps(S.serialize(sched)))
    again = S.deserialize(config)
    assert again == sched and again is not sched
    assert [again(t) for t in range(0, 200, 7)] == [sched(t) for t in range(0, 200, 7)]
    opt = fn.Adam(lr=sched)
    cfg = json.loads(json.dumps(opt.get_config()))
    assert cfg["lr"] == {"class_name": type(sched).__name__, "config": sched.get_config()}
    rebuilt = fn.optim.from_config("Adam", cfg)
    assert rebuilt.lr_schedule == sched
    assert repr(opt).startswith(f"Adam(lr={sched!r}")


def test_a_saved_model_resumes_on_its_schedule(tmp_path):
    x, y = _data()
    sched = S.StepDecay(0.1, step_size=5, gamma=0.3)
    a = _mlp(lr=sched)
    a.fit(x, y, epochs=4, batch_size=8, verbose=0)            # shuffled: uses the rng
    b = _mlp(lr=sched)
    b.fit(x, y, epochs=2, batch_size=8, verbose=0)
    b.save(tmp_path / "m.npz")
    c = fn.load_model(tmp_path / "m.npz")
    assert c.optimizer.lr_schedule == sched and c.optimizer.iterations == 8
    assert c.optimizer.lr == sched(8) == 0.1 * 0.3
    c.fit(x, y, epochs=2, batch_size=8, verbose=0)
    np.testing.assert_array_equal(c.params, a.params)


# ------------------------------------------------------------ bad arguments

@pytest.mark.parametrize("make,exc,match", [
    (lambda: S.StepDecay(-0.1, 5), ValueError, "initial_learning_rate"),
    (lambda: S.StepDecay(0.1, 0), ValueError, "step_size"),
    (lambda: S.StepDecay(0.1, 2.5), TypeError, "step_size"),
    (lambda: S.StepDecay(0.1, 5, gamma=1.5), ValueError, "gamma"),
    (lambda: S.ExponentialDecay(0.1, 10, float("nan")), ValueError, "decay_rate"),
    (lambda: S.ExponentialDecay(0.1, 10, 0.9, staircase="yes"), TypeError, "staircase"),
    (lambda: S.ExponentialDecay("0.1", 10, 0.9), TypeError, "initial_learning_rate"),
    (lambda: S.CosineDecay(0.1, 0), ValueError, "decay_steps"),
    (lambda: S.CosineDecay(0.1, 10, alpha=-0.1), ValueError, "alpha"),
    (lambda: S.CosineDecay(0.1, 10, warmup_steps=5), ValueError, "warmup_target"),
    (lambda: S.CosineDecay(0.1, 10, warmup_target=float("inf"), warmup_steps=5), ValueError,
     "warmup_target"),
    (lambda: S.CosineDecay(0.1, 10, warmup_target=0.2, warmup_steps=-1), ValueError,
     "warmup_steps"),
    (lambda: S.StepDecay(0.1, 5)(-1), ValueError, "step"),
    (lambda: S.StepDecay(0.1, 5)(1.0), TypeError, "step"),
    (lambda: fn.SGD(lr="0.1"), TypeError, "lr"),
    (lambda: fn.SGD(lr=-1.0), ValueError, "lr"),
    (lambda: fn.Adam(lr=lambda epoch: 0.1), TypeError, "LearningRateScheduler"),
    (lambda: S.deserialize({"class_name": "OneCycle", "config": {}}), ValueError, "OneCycle"),
    (lambda: S.deserialize({"class_name": "StepDecay", "config": {"step": 3}}), ValueError,
     "StepDecay"),
    (lambda: S.deserialize([1, 2]), ValueError, "class_name"),
])
def test_bad_arguments(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


class _Broken(S.LearningRateSchedule):
    """A user's schedule that goes wrong after two steps."""

    def __call__(self, step):
        return 0.1 if step < 2 else float("nan")

    def get_config(self):
        return {}


def test_a_schedule_giving_a_bad_rate_stops_before_writing():
    p, g = np.ones(3), np.ones(3)
    opt = fn.RMSprop(lr=_Broken())
    opt.step([p], [g])
    opt.step([p], [g])
    snap, state = p.copy(), {k: a.copy() for k, a in opt._states[0].items()}
    with pytest.raises(ValueError, match="gave lr=nan at step 2"):
        opt.step([p], [g])
    np.testing.assert_array_equal(p, snap)
    for k, a in opt._states[0].items():
        np.testing.assert_array_equal(a, state[k])
    assert opt.iterations == 2
    # a user's schedule cannot be stored (load_model could not rebuild it)
    with pytest.raises(TypeError, match="_Broken"):
        opt.get_config()
    assert repr(opt).startswith("RMSprop(lr=_Broken()")
