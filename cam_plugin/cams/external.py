"""Methods of the optional ``grad-cam`` package (pytorch-grad-cam), selected
as ``"pgc:<ClassName>"``.

That package min-max normalises every map to [0, 1] at the input size, so
these maps carry no raw scale; they are offered for comparison with the
methods it has and this plugin does not.

The package is imported only when such a method is asked for, so it stays
optional.
"""

import torch

from .capture import CamError
from .registry import MethodSpec, register_prefix


def pytorch_grad_cam_method(class_name):
    """The :class:`MethodSpec` of the grad-cam package's class ``class_name``
    (``"EigenGradCAM"``)."""
    try:
        import pytorch_grad_cam
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    except ImportError:
        raise CamError(
            f"Method 'pgc:{class_name}' needs the grad-cam package: "
            "pip install grad-cam"
        ) from None

    cls = getattr(pytorch_grad_cam, class_name, None)
    if cls is None:
        names = sorted(n for n in dir(pytorch_grad_cam) if n.endswith("CAM"))
        raise CamError(
            f"The grad-cam package has no method '{class_name}'. "
            f"Available: {', '.join(names)}"
        )

    def run(ctx, classes):
        layer = ctx.model.get_submodule(ctx.layer)
        layout = ctx.layout
        reshape = None if layout.kind == "nchw" else layout.to_nchw
        maps = []
        with cls(
            model=ctx.model, target_layers=[layer], reshape_transform=reshape
        ) as method:
            for t in range(classes.shape[1]):
                targets = [ClassifierOutputTarget(int(c)) for c in classes[:, t]]
                out = method(input_tensor=ctx.inputs, targets=targets)
                maps.append(torch.as_tensor(out, device=ctx.inputs.device))

        return torch.stack(maps, dim=1).float()

    return MethodSpec(
        f"pgc:{class_name}",
        run,
        False,
        f"grad-cam package's {class_name} (maps min-max normalised by that package)",
        full_resolution=True,
    )


register_prefix("pgc:", pytorch_grad_cam_method)
