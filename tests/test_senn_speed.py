"""SENN's faster exact robustness penalty (issue 16) still computes the paper's loss exactly.

Alvarez-Melis & Jaakkola 2018, Sec. 3: ``L_theta = mean_b || grad_x f(x_b) - theta(x_b)^T J_x h(x_b) ||_F``.
The speed-ups are (i) :class:`interpzoo.layers.senn.InputConv2d`, whose input gradient (and its double
backward) avoids oneDNN's slow backward kernels, and (ii) the conceptizer run on a detached input when
only the ``stopgrad`` penalty on the logits is trained. Every check here is against an independent
computation in float64: the full per-sample Jacobians from ``torch.autograd.functional.jacobian`` on a
twin network built from plain ``nn.Conv2d`` layers, and their derivatives w.r.t. every parameter.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.autograd.functional import jacobian

from interpzoo.layers.senn import InputConv2d, robustness_loss
from interpzoo.models import create_model
from interpzoo.models.senn import SENN

torch.set_num_threads(1)


def _image_net(num_classes: int = 3, dropout: float = 0.0) -> SENN:
    torch.manual_seed(0)
    return create_model(
        "senn",
        num_classes=num_classes,
        in_chans=1,
        image_size=16,
        mean=[0.4],
        std=[0.3],
        conceptizer={"type": "cnn_ae", "n_concepts": 3},
        parametrizer={"type": "lenet", "dropout": dropout},
    ).double()


def _native_twin(net: SENN) -> SENN:
    """The same network (same weights) with every InputConv2d replaced by a plain nn.Conv2d."""
    twin = _image_net(net.num_classes)
    for parent in twin.modules():
        for name, child in list(parent.named_children()):
            if isinstance(child, InputConv2d):
                plain = nn.Conv2d(
                    child.in_channels, child.out_channels, child.kernel_size, padding=child.padding
                )
                setattr(parent, name, plain.double())
    assert not any(isinstance(m, InputConv2d) for m in twin.modules())
    twin.load_state_dict(net.state_dict())  # also checks that the state-dict keys are unchanged
    return twin


def _brute_force_penalty(net: SENN, x: torch.Tensor) -> torch.Tensor:
    """``mean_b ||J_x f - theta^T J_x h||_F`` (normalised-input units), from full per-sample Jacobians.

    ``create_graph`` keeps the Jacobians differentiable, so the result's parameter gradients are the
    brute-force reference too.
    """
    scale = net.input_scale()
    norms = []
    for b in range(x.shape[0]):
        xb = x[b].detach()
        jf = jacobian(lambda v: net(v[None]).logits[0], xb, create_graph=True)  # (C, *in)
        jh = jacobian(lambda v: net(v[None]).concepts[0], xb, create_graph=True)  # (k, *in)
        theta = net(xb[None]).relevances[0]  # (k, C)
        residual = (jf - torch.einsum("kc,k...->c...", theta, jh)) * scale
        norms.append(torch.linalg.vector_norm(residual))
    return torch.stack(norms).mean()


def _fast_penalty(net: SENN, x: torch.Tensor, concept_input_grad: bool) -> torch.Tensor:
    xx = x.clone().requires_grad_(True)
    out = net(xx, concept_input_grad=concept_input_grad)
    return robustness_loss(xx, out.concepts, out.relevances, out.logits, input_scale=net.input_scale())


@pytest.mark.parametrize("concept_input_grad", [True, False])
def test_fast_exact_penalty_equals_brute_force_in_value_and_parameter_gradient(
    concept_input_grad: bool,
) -> None:
    net = _image_net()
    assert isinstance(net.parametrizer.backbone[0], InputConv2d)
    assert isinstance(net.conceptizer.encoder[0], InputConv2d)
    twin = _native_twin(net)
    x = torch.rand(3, 1, 16, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    fast = _fast_penalty(net, x, concept_input_grad)
    fast_grads = torch.autograd.grad(fast, list(net.parameters()), allow_unused=True)
    brute = _brute_force_penalty(twin, x)
    brute_grads = torch.autograd.grad(brute, list(twin.parameters()), allow_unused=True)

    assert brute.item() > 1e-3
    torch.testing.assert_close(fast, brute, rtol=1e-10, atol=0)
    names = [n for n, _ in net.named_parameters()]
    checked = 0
    for name, a, b in zip(names, fast_grads, brute_grads):
        if b is None or not b.abs().max() > 0:  # e.g. the decoder, which the penalty does not see
            assert a is None or a.abs().max() == 0, name
            continue
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12, msg=lambda m, n=name: f"{n}: {m}")
        checked += 1
    # both first convolutions (through theta, and through h as the VJP vector) get a penalty gradient
    assert "parametrizer.backbone.0.weight" in names and "conceptizer.encoder.0.weight" in names
    assert checked >= 8, checked


def test_fast_path_is_taken_only_where_it_applies() -> None:
    conv = InputConv2d(1, 4, 3).double()
    x = torch.rand(2, 1, 8, 8, dtype=torch.float64, requires_grad=True)
    assert type(conv(x).grad_fn).__name__ == "_ConvInputGradientBackward"
    assert type(conv(x.detach()).grad_fn).__name__ == "ConvolutionBackward0"  # no input grad needed
    multi = InputConv2d(3, 4, 3).double()  # C_in > 1: measured slower, plain nn.Conv2d
    assert type(multi(torch.rand(2, 3, 8, 8, dtype=torch.float64, requires_grad=True)).grad_fn).__name__ == (
        "ConvolutionBackward0"
    )
    strided = InputConv2d(1, 4, 3, stride=2).double()
    assert type(strided(x).grad_fn).__name__ == "ConvolutionBackward0"


@pytest.mark.parametrize("padding", [0, (2, 1)])
def test_input_conv_derivatives_match_nn_conv2d_to_third_order(padding: int | tuple[int, int]) -> None:
    """Value, input gradient, the penalty-style double backward and one more order, vs nn.Conv2d."""
    torch.manual_seed(0)
    fast = InputConv2d(1, 5, (5, 3), padding=padding).double()
    plain = nn.Conv2d(1, 5, (5, 3), padding=padding).double()
    plain.load_state_dict(fast.state_dict())
    x = torch.randn(3, 1, 11, 9, dtype=torch.float64)
    results = []
    for conv in (fast, plain):
        xx = x.clone().requires_grad_(True)
        y = torch.tanh(conv(xx))
        v = torch.linspace(-1, 1, y.numel(), dtype=torch.float64).view_as(y)
        (gx,) = torch.autograd.grad(y, xx, v, create_graph=True)  # a VJP w.r.t. the input
        loss = gx.square().sum() + y.sum()
        g1 = torch.autograd.grad(loss, [xx, *conv.parameters()], create_graph=True)
        g2 = torch.autograd.grad(sum(g.square().sum() for g in g1), list(conv.parameters()))
        results.append((y, gx, g1, g2))
    (yf, gxf, g1f, g2f), (yp, gxp, g1p, g2p) = results
    torch.testing.assert_close(yf, yp, rtol=0, atol=0)  # the same native convolution
    torch.testing.assert_close(gxf, gxp, rtol=1e-12, atol=1e-12)
    assert gxp.abs().max() > 1e-2
    for a, b in zip((*g1f, *g2f), (*g1p, *g2p)):
        assert b.abs().max() > 0
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_module_training_step_detaches_concepts_only_for_stopgrad_logits() -> None:
    """The module's loss and parameter gradients are those of the full-graph forward."""
    from interpzoo.api import quiet_trainer
    from interpzoo.models.lit_senn import SENNModule

    info = {"num_classes": 3, "in_chans": 1, "image_size": [16, 16], "mean": [0.4], "std": [0.3]}
    x = torch.rand(4, 1, 16, 16, generator=torch.Generator().manual_seed(2))
    batch = {"image": x, "label": torch.tensor([0, 1, 2, 0]), "index": torch.arange(4)}
    grads = {}
    for detach in (True, False):
        torch.manual_seed(0)
        mod = SENNModule(data_info=info, robustness_lambda=0.5, lipschitz={"points": 0})
        mod.log = lambda *args, **kwargs: None  # type: ignore[method-assign]  # no Trainer to log to
        mod.trainer = quiet_trainer(max_epochs=1)
        mod.net.parametrizer.dropout.p = 0.0  # deterministic, so the two runs are comparable
        for m in mod.net.modules():
            if isinstance(m, nn.Dropout2d):
                m.p = 0.0
        mod.train()
        assert mod._concepts_constant_in_penalty()
        if not detach:  # the reference: the plain forward, with concepts differentiable in x
            mod._concepts_constant_in_penalty = lambda: False  # type: ignore[method-assign]
        xx = x.clone().requires_grad_(True)
        out = mod(xx)
        assert (out.concepts.grad_fn is not None) and (
            torch.autograd.grad(out.concepts.sum(), xx, allow_unused=True)[0] is None
        ) == detach
        loss = mod.training_step(batch, 0)
        grads[detach] = (loss.detach(), torch.autograd.grad(loss, list(mod.parameters()), allow_unused=True))
    torch.testing.assert_close(grads[True][0], grads[False][0], rtol=1e-6, atol=0)
    for a, b in zip(grads[True][1], grads[False][1]):
        if b is None:
            assert a is None
            continue
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
