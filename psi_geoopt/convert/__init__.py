r"""Find the positively scale-invariant (PSI) weights of a model and put them on the PSI manifold.

A parameter :math:`W`, split into groups along an axis ``dim`` as in
:class:`~psi_geoopt.PSIManifold`, is *positively scale invariant* when the training-mode output
of the model does not change if every group :math:`w_k` is multiplied by its own
:math:`c_k > 0`: :math:`f(\ldots, c \odot W, \ldots) = f(\ldots, W, \ldots)`. The loss then is
PSI too, whatever it is computed from the output. Invariance is a property of the training
objective, for every value the other parameters may take during training: the answer must not
depend on where in training the model is.

Decision rule
-------------
Only the weights of linear maps are candidates: the ``weight`` of ``Linear``, ``Conv1d/2d/3d``
and ``ConvTranspose1d/2d/3d`` modules and the ``weight`` argument of ``F.linear``,
``F.conv*d`` and ``F.conv_transpose*d``, also where that argument is computed from a
parameter of the same shape without the inputs (weight standardization). For each candidate
two groupings are tried, the finest first: one group per output channel (``dim=0`` for
``Linear``/``Conv`` weights ``(out, in, ...)``, ``dim=1`` for ``ConvTranspose`` weights
``(in, out/groups, ...)`` when ``groups == 1``), then the whole tensor (``dim=None``).

The tests run on a deep copy in training mode, in float64 (``convert/tracing.py``), whose trainable
parameters that are not candidates get generic random values, and candidates that are zero
random ones: a bias that starts at zero, a BatchNorm scale zero-initialized at the end of a
residual branch or a layer scale of ``1e-6`` would otherwise decide the answer. Frozen
parameters keep their values. A grouping is accepted when

1. **structurally** (the copy traced with :mod:`torch.fx`; ``convert/structural.py``): every value
   computed from the weight can be written :math:`F \odot x + O`, where the positive factor
   :math:`F` depends on the :math:`c_k` and the offset :math:`O` does not, and every such value
   reaches the output only through a normalization that removes both, i.e. :math:`F` and
   :math:`O` are constant over each normalized slice. :math:`F` and :math:`O` are followed as
   tensors with the shapes of the recorded activations, for one random draw of the
   :math:`c_k`, by the rules of :data:`.rules.RULES`:

   - the linear map itself gives :math:`F = c` on its output channel axis and :math:`O` = its
     bias (a later linear map keeps :math:`F` if :math:`F` is constant along the axes it
     contracts, and maps :math:`O` with its own weight and bias);
   - ReLU, LeakyReLU, PReLU and dropout keep :math:`F` (positive homogeneity) and need
     :math:`O = 0`; max/avg/adaptive pooling needs :math:`F` and :math:`O` constant inside its
     windows (and no :math:`O` through a zero-padded average), ``mean`` needs :math:`F`
     constant along the averaged axes; flatten/view/reshape/permute/transpose/squeeze/indexing,
     ``chunk``/``split`` and ``cat``/``stack`` (other inputs pass by with :math:`F = 1`) move
     :math:`F` and :math:`O` with the data, so channels keep their order; shape queries
     (``size``, ``shape``, the argument of ``reshape_as``) are not scaled;
   - adding a tensor not computed from the weight adds it to :math:`O`; adding two values
     computed from the weight needs the same :math:`F`; multiplying by a tensor not computed
     from the weight keeps :math:`F` and multiplies :math:`O`;
   - BatchNorm1d/2d/3d and SyncBatchNorm with batch statistics normalize over all axes but
     the channel, InstanceNorm over the spatial axes, LayerNorm over its ``normalized_shape``,
     GroupNorm over each group of channels (so per-channel factors survive it unless a group
     holds one channel), RMSNorm like LayerNorm but only when :math:`O = 0`; the functional
     forms (``F.batch_norm`` with ``training=True``, ``F.layer_norm``, ...) likewise. A
     per-channel bias is removed only by a mean over axes along which it is constant
     (BatchNorm, InstanceNorm, GroupNorm of one channel per group), not by a LayerNorm over
     channels or a GroupNorm of several channels per group;
   - weight standardization: ``var``/``std`` (and ``var_mean``/``std_mean``) over axes along
     which :math:`F` and :math:`O` are constant give :math:`F^2`/:math:`F` without offset,
     ``sqrt``/``rsqrt``/``pow`` raise :math:`F` to their power, products and quotients of
     values computed from the weight multiply or divide their factors, and where these cancel
     (``(w - mean) / std``, or ``F.batch_norm`` of the reshaped weight, as timm's
     ``StdConv2d`` and ``ScaledStdConv2d`` compute it) the scale is removed; the ``eps`` added
     to a variance before the division is ignored, as the ``eps`` of a normalization is;
   - anything else reached by :math:`F` (sigmoid, an unknown module, a shortcut added to it,
     the model's output) means "not invariant". A weight that reaches no normalization is not
     invariant either.

2. **numerically** (``convert/numeric.py``), on the same copy with the ``eps`` of every
   normalization set to ``1e-30`` (in modules, in linear-map modules that standardize their
   weight, and, when traced, in functional calls and in ``var + eps``), the random seed fixed
   for every forward pass (dropout draws the same masks): multiplying the groups of all the
   proposed weights at once, each group by its own factor :math:`10^{U(-2, 2)}`, changes no
   output by more than :math:`10^{-7}` times its largest entry, and the gradient there of a
   random projection of the outputs has no radial component :math:`\langle g_k, w_k \rangle`
   on any group (above :math:`10^{-8}` relative; it vanishes for an invariant group by Euler's
   theorem). A weight with a radial component fails and the others are tested again without
   it; where none shows but the outputs changed, the set is split in halves until the failing
   weights are found. A weight that fails goes on to its next grouping. The same gradient
   tells whether the weight has an effect: rotating its groups by 0.3 rad towards it changes
   the outputs, to first order, by more than :math:`10^{-6}` of their largest entries (where
   the gradient vanishes, a rotation in a random direction is tried: a depthwise convolution
   on a 1x1 image acts only through the signs of its centre taps). A zero group fails
   earlier: it is no point of the manifold.

The cost is a deep copy, a trace, one recorded forward pass, one forward and backward pass
for all the weights (more only where some weight fails the numeric test; a traced copy then
runs again only the nodes computed from the changed weights) and a structural walk per weight
over the nodes computed from it. When :mod:`torch.fx` cannot trace the model
(data-dependent control flow), only the numeric test decides, for the ``weight`` of the
linear-map modules listed above, and a warning says so (the ``eps`` of functional
normalizations then stays, which can only turn a "yes" into a "no"). When the model does not
run in float64 (e.g. float32 tensors created inside ``forward``), the copy keeps the model's
own precision and the thresholds become :math:`10^{-4}` and :math:`10^{-3}`. Probing never
touches the model: it works on a deep copy, inside :func:`torch.random.fork_rng`, so
parameters, buffers (running statistics, ``num_batches_tracked``), training flags and the
global random state are left as they were. :func:`explain_scale_invariance` returns every
decision with its reason.
"""

from .api import explain_scale_invariance, find_scale_invariant, param_groups, to_psi
from .report import Decision, ScaleInvarianceReport

__all__ = [
    "Decision",
    "ScaleInvarianceReport",
    "explain_scale_invariance",
    "find_scale_invariant",
    "param_groups",
    "to_psi",
]
