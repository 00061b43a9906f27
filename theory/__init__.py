r"""Numerical checks of the convergence statements of PSI GD and SGD (``psi-geoopt verify``).

The PSI manifold is a product of spheres, so the standard results of Riemannian optimization
(Boumal, *An Introduction to Optimization on Smooth Manifolds*, 2023, ch. 4) hold on it. With
:math:`L` the smoothness constant of the pullback :math:`f \circ \operatorname{retr}` in the
metric :math:`g`, this package states them for PSI losses and measures both sides of each
inequality on small float64 problems:

- PSI GD with :math:`\eta \le 1/L`: :math:`f(w_{t+1}) - f(w_t) \le -\frac\eta2
  \|\operatorname{grad} f(w_t)\|_g^2` at every step, and :math:`\min_{t<T}
  \|\operatorname{grad} f(w_t)\|_g^2 \le 2(f(w_0) - f^*)/(\eta T)`;
- PSI SGD with unbiased gradients of variance :math:`\sigma^2` and constant :math:`\eta \le
  1/L`: :math:`\min_{t<T} E\|\operatorname{grad} f\|_g^2 \le 2(f(w_0) - f^*)/(\eta T) +
  L\eta\sigma^2`, which is :math:`O(1/\sqrt T)` with :math:`\eta \propto 1/\sqrt T`;
- equivariance: PSI GD, SGD, momentum and Adam from :math:`W_0` and :math:`S W_0` give the
  same points of the quotient; Euclidean GD does not;
- Euclidean GD on a PSI loss: :math:`\|w_{t+1}\|^2 = \|w_t\|^2 + \eta^2\|\nabla f(w_t)\|^2`,
  and PSI GD against Euclidean GD from initial scales 0.1, 1 and 10;
- negative controls that must fail (a step above :math:`2/L`, a loss that is not scale
  invariant).

Each check returns a record: ``observed`` and ``bound`` are the two sides of the inequality
stated in ``statement``, ``relation`` is ``"<="`` or ``">="``, and ``passed`` is exactly
whether ``observed relation bound`` holds (:func:`checks.holds`); a negative control's
``violated`` is ``not passed``. The derivations, problems and measured outcome are in
theory/README.md.

Modules: :mod:`.problems` (the test problems, :math:`f^*`, :math:`L`), :mod:`.smoothness`
(sampled smoothness constants), :mod:`.runs` (recorded optimizer runs), :mod:`.checks` (one
function per check), :mod:`.suite` (the quick and full budgets), :mod:`.verify` (the
sub-command) and :mod:`.plots` (its figures). Example::

    from psi_geoopt.theory import checks
    from psi_geoopt.theory.suite import build_problem

    rate, descent = checks.gd_rate(build_problem("rayleigh-k10"), steps=200)
    assert rate["passed"] == checks.holds(rate["observed"], rate["relation"], rate["bound"])
"""
