r"""Find the positively scale-invariant (PSI) weights of a model and put them on the PSI manifold.

A parameter :math:`W`, split into groups along an axis ``dim`` as in
:class:`~psi_geoopt.PSIManifold`, is *positively scale invariant* when the training-mode output
of the model does not change if every group :math:`w_k` is multiplied by its own
:math:`c_k > 0`: :math:`f(\ldots, c \odot W, \ldots) = f(\ldots, W, \ldots)`. The loss then is
PSI too, whatever it is computed from the output.

Decision rule
-------------
Only the weights of linear maps are candidates: the ``weight`` of ``Linear``, ``Conv1d/2d/3d``
and ``ConvTranspose1d/2d/3d`` modules and the ``weight`` argument of ``F.linear``,
``F.conv*d`` and ``F.conv_transpose*d``. For each candidate two groupings are tried, the
finest first: one group per output channel (``dim=0`` for ``Linear``/``Conv`` weights
``(out, in, ...)``, ``dim=1`` for ``ConvTranspose`` weights ``(in, out/groups, ...)`` when
``groups == 1``), then the whole tensor (``dim=None``). A grouping is accepted when

1. **structurally** (the model is traced with :mod:`torch.fx` on a float64 copy in training
   mode): every value computed from the weight can be written :math:`F \odot x + O`, where the
   positive factor :math:`F` depends on the :math:`c_k` and the offset :math:`O` does not, and
   every such value reaches the output only through a normalization that removes both, i.e.
   :math:`F` and :math:`O` are constant over each normalized slice. :math:`F` and :math:`O`
   are followed as tensors with the shapes of the recorded activations, for one random draw of
   the :math:`c_k`:

   - the linear map itself gives :math:`F = c` on its output channel axis and :math:`O` = its
     bias (a later linear map keeps :math:`F` if :math:`F` is constant along the axes it
     contracts, and maps :math:`O` with its own weight and bias);
   - ReLU, LeakyReLU, PReLU and dropout keep :math:`F` (positive homogeneity) and need
     :math:`O = 0`; max/avg/adaptive pooling needs :math:`F` and :math:`O` constant inside its
     windows (and no :math:`O` through a zero-padded average), ``mean`` needs :math:`F`
     constant along the averaged axes; flatten/view/reshape/permute/transpose/squeeze/indexing,
     ``chunk``/``split`` and ``cat``/``stack`` (other inputs pass by with :math:`F = 1`) move
     :math:`F` and :math:`O` with the data, so channels keep their order; shape queries
     (``size``, ``shape``) are not scaled;
   - adding a tensor not computed from the weight adds it to :math:`O`; adding two values
     computed from the weight needs the same :math:`F`; multiplying by a tensor not computed
     from the weight keeps :math:`F` and multiplies :math:`O`;
   - BatchNorm1d/2d/3d and SyncBatchNorm with batch statistics normalize over all axes but
     the channel, InstanceNorm over the spatial axes, LayerNorm over its ``normalized_shape``,
     GroupNorm over each group of channels (so per-channel factors survive it unless a group
     holds one channel), RMSNorm like LayerNorm but only when :math:`O = 0`; the functional
     forms (``F.batch_norm`` with ``training=True``, ``F.layer_norm``, ...) likewise;
   - anything else reached by :math:`F` (sigmoid, an unknown module, a shortcut added to it,
     the model's output) means "not invariant". A weight that reaches no output at all is not
     invariant either (it has no effect).

2. **numerically**, on the same float64 copy with the ``eps`` of every normalization set to
   ``1e-30`` (in modules and, when traced, in functional calls), the random seed fixed for
   every forward pass (dropout draws the same masks) and in training mode: multiplying the
   groups by factors :math:`10^{U(-2, 2)}` changes no output by more than :math:`10^{-7}`
   times its largest entry, and rotating every group by 0.3 rad away from itself changes some
   output by more than :math:`10^{-4}` times its largest entry (the parameter has an effect;
   a zero group fails here too, since it is no point of the manifold). To save forward passes,
   :func:`find_scale_invariant` first rescales all the structurally accepted weights at once
   (each group by its own factor) and tests them one by one only if that changes the output;
   the effect test is always one weight at a time.

When :mod:`torch.fx` cannot trace the model (data-dependent control flow), only the numeric
test decides, for the ``weight`` of the linear-map modules listed above, and a warning says so
(the ``eps`` of functional normalizations then stays, which can only turn a "yes" into a "no").
When the model does not run in float64 (e.g. float32 tensors created inside ``forward``), the
copy keeps the model's own precision and the thresholds become :math:`10^{-4}` and
:math:`10^{-2}`.
Probing never touches the model: it works on a deep copy, inside
:func:`torch.random.fork_rng`, so parameters, buffers (running statistics,
``num_batches_tracked``), training flags and the global random state are left as they were.
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
