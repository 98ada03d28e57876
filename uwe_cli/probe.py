"""The linear probe of `uwe simulate`: L2-regularised multinomial logistic regression on pool features.

It stands in for the team's model: cheap to refit every cycle, deterministic (full-batch Newton-CG in
float64 from zero weights, no sampling), and it minimises scikit-learn's `LogisticRegression`
objective (C · Σ cross-entropy + ½‖W‖², intercept not penalised; one weight vector for two classes,
one per class otherwise), so its predictions match a converged scikit-learn fit of the same data
(scikit-learn's defaults stop after 100 L-BFGS steps, often short of the optimum). Classes
absent from the labeled set get probability 0, as scikit-learn's `classes_` would leave them out.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PREDICT_CHUNK_ROWS = 65_536


@dataclass
class Probe:
    """A fitted probe over `num_classes` classes; `classes` are the ones seen in training (ascending)."""

    num_classes: int
    classes: np.ndarray
    weights: np.ndarray | None  # (d, m) float64: m = 1 for two classes, else one column per seen class
    bias: np.ndarray | None  # (m,) float64
    newton_steps: int = 0
    cg_steps: int = 0  # Hessian-vector products, the cost that matters

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        """(n, num_classes) float64 class probabilities, computed in float64 in chunks of rows."""
        n = features.shape[0]
        probs = np.zeros((n, self.num_classes), dtype=np.float64)
        if self.weights is None:  # one class seen: it is certain
            probs[:, self.classes[0]] = 1.0
            return probs
        for start in range(0, n, PREDICT_CHUNK_ROWS):
            block = np.asarray(features[start : start + PREDICT_CHUNK_ROWS], dtype=np.float64)
            probs[start : start + block.shape[0], self.classes] = _softmax(self._logits(block))
        return probs

    def _logits(self, X: np.ndarray) -> np.ndarray:
        assert self.weights is not None and self.bias is not None
        z = X @ self.weights + self.bias
        if z.shape[1] == 1:  # binary: the first class is the reference with logit 0
            z = np.concatenate([np.zeros_like(z), z], axis=1)
        return z

    def predict(self, features: np.ndarray) -> np.ndarray:
        """The most probable class per row (ties to the lower class index, as argmax does)."""
        return np.argmax(self.predict_proba(features), axis=1)


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def fit_probe(
    features: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    C: float = 1.0,
    tol: float = 1e-9,
    max_newton: int = 100,
    max_cg: int = 500,
) -> Probe:
    """Fit the probe on (n, d) features and integer labels in [0, num_classes).

    Newton-CG: each step solves H·p = −g by conjugate gradients on Hessian-vector products (two matrix
    products each, the Hessian is never formed), then backtracks until the objective drops. Near the
    optimum it converges quadratically, so the tight default `tol` (on the largest gradient entry of the
    objective divided by n) costs a few steps more than a loose one.
    """
    import torch

    classes = np.unique(labels)
    if classes.size < 2:
        return Probe(num_classes, classes, None, None)
    X64 = np.ascontiguousarray(features, dtype=np.float64)
    n = X64.shape[0]
    penalty = 0.5 / (C * n)
    # Preconditioning: optimise V = s·W on rescaled features ((x − μ)/s)·V + c, the same objective as a
    # function of (W, b), hence the same minimiser. s² = var + 2·penalty gives every coordinate a
    # curvature of order one whether the data term (spread features) or the penalty (near-constant
    # features, e.g. ReLU units that rarely fire) dominates.
    mu = X64.mean(axis=0)
    scale = np.sqrt(X64.var(axis=0) + 2.0 * penalty)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small products: a thread team costs more than it saves, far more when busy
    try:
        V, c, steps, cg_steps = _newton_cg(
            torch.from_numpy((X64 - mu) / scale),
            torch.from_numpy(np.searchsorted(classes, labels).astype(np.int64)),
            classes.size,
            torch.from_numpy(2.0 * penalty / scale**2)[:, None],
            tol,
            max_newton,
            max_cg,
        )
    finally:
        torch.set_num_threads(threads)
    W = V / scale[:, None]
    b = c - mu @ W
    return Probe(num_classes, classes, W, b, steps, cg_steps)


def _newton_cg(X, y, k: int, ridge, tol: float, max_newton: int, max_cg: int):
    """Minimise mean CE(X·V + c) + ½ Σ ridge·V² over (V, c); two classes use one column (logit 0 for the first)."""
    import torch

    n, d = X.shape
    m = 1 if k == 2 else k
    XT = X.T.contiguous()  # Xᵀ·S on a contiguous copy runs twice as fast as on the transposed view
    X2T = (X * X).T.contiguous()
    free = slice(1, 2) if k == 2 else slice(0, k)
    Y = torch.zeros((n, k), dtype=torch.float64)
    Y[torch.arange(n), y] = 1.0
    V = torch.zeros((d, m), dtype=torch.float64)
    c = torch.zeros(m, dtype=torch.float64)

    def logits(V, c):
        z = torch.zeros((n, k), dtype=torch.float64)
        z[:, free] = X @ V + c
        return z

    def objective(V, c) -> float:
        z = logits(V, c)
        ce = (torch.logsumexp(z, dim=1) - (z * Y).sum(dim=1)).mean()
        return float(ce + 0.5 * (ridge * V * V).sum())

    steps = 0
    total_cg = 0
    f = objective(V, c)
    for steps in range(1, max_newton + 1):
        P = torch.softmax(logits(V, c), dim=1)
        R = (P - Y)[:, free] / n
        gV = XT @ R + ridge * V
        gc = R.sum(dim=0)
        gmax = max(float(gV.abs().max()), float(gc.abs().max()))
        if gmax <= tol:
            steps -= 1
            break

        def hvp(DV, Dc, P=P):
            A = torch.zeros((n, k), dtype=torch.float64)
            A[:, free] = X @ DV + Dc
            PA = P * A
            S = (PA - P * PA.sum(dim=1, keepdim=True))[:, free] / n
            return XT @ S + ridge * DV, S.sum(dim=0)

        # Conjugate gradients on H·p = −g, preconditioned by the Hessian's diagonal, to a relative
        # residual min(0.5, √‖g‖) (inexact Newton).
        Q = (P * (1.0 - P))[:, free] / n
        MV = 1.0 / (X2T @ Q + ridge)
        Mc = 1.0 / Q.sum(dim=0).clamp_min(1e-300)
        g_norm = float(torch.sqrt((gV * gV).sum() + (gc * gc).sum()))
        target = min(0.5, g_norm**0.5) * g_norm
        pV, pc = torch.zeros_like(V), torch.zeros_like(c)
        rV, rc = -gV, -gc
        zV, zc = MV * rV, Mc * rc
        dV, dc = zV.clone(), zc.clone()
        rz = float((rV * zV).sum() + (rc * zc).sum())
        cg_steps = 0
        for cg_steps in range(max_cg):  # noqa: B007
            if float(torch.sqrt((rV * rV).sum() + (rc * rc).sum())) <= target:
                break
            hV, hc = hvp(dV, dc)
            curvature = float((dV * hV).sum() + (dc * hc).sum())
            if curvature <= 0:
                break
            alpha = rz / curvature
            pV, pc = pV + alpha * dV, pc + alpha * dc
            rV, rc = rV - alpha * hV, rc - alpha * hc
            zV, zc = MV * rV, Mc * rc
            rz_new = float((rV * zV).sum() + (rc * zc).sum())
            dV, dc = zV + (rz_new / rz) * dV, zc + (rz_new / rz) * dc
            rz = rz_new
        total_cg += cg_steps
        if not pV.abs().max() > 0 and not pc.abs().max() > 0:
            pV, pc = -gV, -gc
        # Backtracking (Armijo) from the full Newton step.
        slope = float((gV * pV).sum() + (gc * pc).sum())
        step = 1.0
        for _ in range(60):
            f_new = objective(V + step * pV, c + step * pc)
            if f_new <= f + 1e-4 * step * slope:
                break
            step *= 0.5
        else:
            break  # no decrease possible: at the optimum to rounding
        V, c, f = V + step * pV, c + step * pc, f_new
    return V.numpy(), c.numpy(), steps, total_cg
