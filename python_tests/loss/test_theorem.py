"""Numerical check of the entropy-drift theorem (AEM_SPEC.md eq. 6) on a tabular softmax policy.

For pi ∝ exp(theta) and the sampled natural-gradient step dtheta = (eta/G) sum_r A_r e_{y_r} / pi(y_r), the
first-order entropy change is (eta/G) sum_r A_r (S_r - H) with S_r = -log pi(y_r); for the plain step
dtheta_{y_r} += eta A_r / G each term carries an extra factor pi(y_r). The error of the first-order formula
must shrink like eta^2.
"""

import pytest
import torch

D = torch.float64


def _entropy(theta):
    log_pi = torch.log_softmax(theta, -1)
    return -(log_pi.exp() * log_pi).sum()


def _drift_errors(natural: bool, seed: int):
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(12, generator=g, dtype=D) * 1.5
    samples = torch.randint(0, 12, (8,), generator=g)
    advantages = torch.randn(8, generator=g, dtype=D)
    log_pi = torch.log_softmax(theta, -1)
    pi, entropy = log_pi.exp(), _entropy(theta)
    surprisal = -log_pi[samples]
    scale = 1.0 / pi[samples] if natural else torch.ones(8, dtype=D)
    direction = torch.zeros(12, dtype=D).index_add(0, samples, advantages * scale) / 8
    factor = torch.ones(8, dtype=D) if natural else pi[samples]
    predicted_per_eta = (advantages * factor * (surprisal - entropy)).sum() / 8
    errors = []
    for eta in (1e-2, 5e-3, 2.5e-3):
        exact = _entropy(theta + eta * direction) - entropy
        errors.append(abs(exact - eta * predicted_per_eta).item())
    return errors, abs(predicted_per_eta.item())


@pytest.mark.parametrize("natural", [True, False])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_first_order_entropy_drift(natural, seed):
    errors, slope = _drift_errors(natural, seed)
    assert slope > 1e-3  # a non-trivial drift, so the check below cannot pass vacuously
    for coarse, fine in zip(errors, errors[1:]):
        assert 3.0 < coarse / fine < 5.0  # halving eta quarters the error: the remainder is O(eta^2)
    assert errors[-1] < 0.1 * 2.5e-3 * slope  # and the first-order term dominates at the smallest eta


def test_sign_of_drift_matches_the_aem_rule():
    # rewarding the most confident response lowers entropy; rewarding the most surprising raises it
    theta = torch.tensor([3.0, 1.0, 0.0, -1.0], dtype=D)
    pi = torch.softmax(theta, -1)
    for response, sign in ((0, -1), (3, +1)):
        direction = torch.zeros(4, dtype=D)
        direction[response] = 1.0 / pi[response]
        assert torch.sign(_entropy(theta + 1e-3 * direction) - _entropy(theta)) == sign
