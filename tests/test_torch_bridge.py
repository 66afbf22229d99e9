"""The torch bridge: autograd through ``moe_router.torch.route`` against torch autograd on the same math,
against Megatron-Core's router functions, and a Hugging Face Mixtral model with its routers swapped.
Runs where torch (and the peers) are installed: the peers venv; skips elsewhere."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import moe_router as mr  # noqa: E402
from moe_router.torch import TopKRouter, route  # noqa: E402


def torch_reference(logits, dec, cfg):
    """The decision's weights and auxiliary loss written in torch (selection from dec, counts constant)."""
    T, E = logits.shape
    k = cfg.top_k
    s = torch.sigmoid(logits) if cfg.score_function == "sigmoid" else torch.softmax(logits, -1)
    idx = torch.from_numpy(dec.expert_indices.astype(np.int64))
    kept = torch.from_numpy(np.array(dec.kept))  # the decision's views are read-only
    S = s.gather(1, idx)
    if cfg.renormalize_after_drop:
        n = S * kept
        w = cfg.weight_scale * n / n.sum(1, keepdim=True)
    elif cfg.normalize_weights:
        w = cfg.weight_scale * S * kept / S.sum(1, keepdim=True)
    else:
        w = cfg.weight_scale * S * kept
    q = s / s.sum(1, keepdim=True)
    f = torch.from_numpy(dec.pre_drop_tokens_per_expert.astype(np.float64)) / (T * k)
    lb = E * (f * q.mean(0)).sum()
    z = (torch.logsumexp(logits, -1) ** 2).mean()
    return w, cfg.load_balance_loss_coeff * lb + cfg.router_z_loss_coeff * z


@pytest.mark.parametrize("score_function", ["softmax", "sigmoid"])
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("cf", [None, 0.75])
def test_route_gradients_equal_torch_autograd(score_function, normalize, cf):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8, dtype=torch.float64, generator=g)
    cfg = mr.RouterConfig(num_experts=8, top_k=2, score_function=score_function, normalize_weights=normalize,
                          capacity_factor=cf, load_balance_loss_coeff=0.3, router_z_loss_coeff=0.01)
    a = x.clone().requires_grad_()
    idx, w, aux, dec = route(a, cfg)
    gw = torch.randn(64, 2, dtype=torch.float64, generator=g)
    ((w.double() * gw).sum() + 1.5 * aux).backward()
    b = x.clone().requires_grad_()
    wr, auxr = torch_reference(b, dec, cfg)
    np.testing.assert_allclose(w.detach().numpy(), wr.detach().numpy(), rtol=1e-6)
    np.testing.assert_allclose(float(aux.detach()), float(auxr.detach()), rtol=1e-12)
    ((wr * gw).sum() + 1.5 * auxr).backward()
    # the weights are float32, so their cotangent arrives rounded to float32
    np.testing.assert_allclose(a.grad.numpy(), b.grad.numpy(), rtol=1e-5, atol=1e-6 * float(b.grad.abs().max()))
    assert idx.dtype == torch.int64 and not idx.requires_grad


def test_float32_and_batched_logits():
    x = torch.randn(2, 16, 8, requires_grad=True)
    idx, w, aux, dec = route(x, mr.preset("mixtral", 8, 2, router_aux_loss_coef=0.01))
    (w.sum() + aux).backward()
    assert x.grad.shape == x.shape and x.grad.dtype == torch.float32 and w.shape == (2, 16, 2)


def megatron_utils():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pytest.importorskip("megatron.core.transformer.moe.moe_utils")


@pytest.mark.parametrize("pre_softmax", [False, True])
@pytest.mark.parametrize("score_function", ["softmax", "sigmoid"])
def test_gradients_equal_megatrons_router_functions(pre_softmax, score_function):
    if score_function == "sigmoid" and pre_softmax:
        pytest.skip("pre_softmax applies to softmax only")
    mu = megatron_utils()
    T, E, k = 128, 16, 4
    g = torch.Generator().manual_seed(3)
    x = torch.randn(T, E, generator=g)
    G = torch.randn(T, E, generator=g)
    coeff = 0.01
    a = x.clone().requires_grad_()
    probs, routing_map = mu.topk_routing_with_score_function(a, k, use_pre_softmax=pre_softmax,
                                                             score_function=score_function)
    map_aux, scores_aux = mu.compute_routing_scores_for_aux_loss(a, k, score_function)
    aux_m = mu.switch_load_balancing_loss_func(probs=scores_aux, tokens_per_expert=map_aux.sum(0), total_num_tokens=T,
                                               topk=k, num_experts=E, moe_aux_loss_coeff=coeff)
    ((probs * G).sum() + aux_m).backward()
    cfg = mr.preset("megatron", E, k, pre_softmax=pre_softmax, score_function=score_function, aux_loss_coeff=coeff)
    b = x.clone().requires_grad_()
    idx, w, aux, dec = route(b, cfg)
    np.testing.assert_array_equal(dec.dispatch_plan().megatron_routing_map()[0], routing_map.numpy())
    ((w * G.gather(1, idx)).sum() + aux).backward()
    np.testing.assert_allclose(float(aux.detach()), float(aux_m.detach()), rtol=1e-5)
    np.testing.assert_allclose(b.grad.numpy(), a.grad.numpy(), rtol=1e-4, atol=1e-6)


def tiny_mixtral():
    tr = pytest.importorskip("transformers")
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                        max_position_embeddings=64, router_aux_loss_coef=0.02, output_router_logits=True)
    torch.manual_seed(0)
    return MixtralForCausalLM(cfg).float(), tr


def test_mixtral_with_swapped_routers_matches_the_stock_model():
    stock, _ = tiny_mixtral()
    swapped, _ = tiny_mixtral()
    swapped.load_state_dict(stock.state_dict())
    for layer in swapped.model.layers:
        block = layer.mlp
        block.gate = TopKRouter.from_hf(block.gate)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    outs = []
    for model in (stock, swapped):
        model.train()
        out = model(input_ids=ids, labels=ids, output_router_logits=True)
        out.loss.backward()
        outs.append(out)
    np.testing.assert_allclose(outs[1].logits.detach().numpy(), outs[0].logits.detach().numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(outs[1].aux_loss.detach()), float(outs[0].aux_loss.detach()), rtol=1e-5)
    grads = dict(stock.named_parameters())
    for name, p in swapped.named_parameters():
        ref = grads[name].grad
        assert (p.grad is None) == (ref is None), name
        if ref is not None:
            np.testing.assert_allclose(p.grad.numpy(), ref.numpy(), rtol=1e-4, atol=1e-6, err_msg=name)
    router = swapped.model.layers[0].mlp.gate
    assert isinstance(router, type(stock.model.layers[0].mlp.gate)) and router.last_decision is not None


def test_permute_and_combine_are_differentiable_end_to_end():
    from moe_router.torch import combine, permute

    g = torch.Generator().manual_seed(5)
    T, E, k, D = 40, 6, 2, 5
    logits = torch.randn(T, E, dtype=torch.float64, generator=g)
    hidden = torch.randn(T, D, dtype=torch.float64, generator=g)
    scale = torch.randn(E, D, dtype=torch.float64, generator=g)
    cfg = mr.RouterConfig(num_experts=E, top_k=k, capacity_factor=1.0, normalize_weights=True,
                          load_balance_loss_coeff=0.1, router_z_loss_coeff=0.0)

    def ours(x, h):
        idx, w, aux, dec = route(x, cfg)
        plan = dec.dispatch_plan(alignment=4)
        rows = permute(plan, h)
        expert = torch.as_tensor(np.searchsorted(plan.expert_offsets, np.arange(plan.num_rows), side="right") - 1)
        out = rows * scale[expert.clamp(max=E - 1)]
        return (combine(plan, out, w).sum(-1) ** 2).sum() + aux, dec

    def theirs(x, h, dec):
        idx = torch.from_numpy(dec.expert_indices.astype(np.int64))
        kept = torch.from_numpy(np.array(dec.kept))
        s = torch.softmax(x, -1).gather(1, idx)
        w = s * kept / s.sum(1, keepdim=True)
        y = (w[..., None] * h[:, None, :] * scale[idx]).sum(1)
        f = torch.from_numpy(dec.pre_drop_tokens_per_expert.astype(np.float64)) / (T * k)
        aux = 0.1 * E * (f * torch.softmax(x, -1).mean(0)).sum()
        return (y.sum(-1) ** 2).sum() + aux

    x1, h1 = logits.clone().requires_grad_(), hidden.clone().requires_grad_()
    loss1, dec = ours(x1, h1)
    loss1.backward()
    x2, h2 = logits.clone().requires_grad_(), hidden.clone().requires_grad_()
    loss2 = theirs(x2, h2, dec)
    loss2.backward()
    # the decision's weights are float32: agreement to float32 precision
    np.testing.assert_allclose(float(loss1.detach()), float(loss2.detach()), rtol=1e-6)
    np.testing.assert_allclose(h1.grad.numpy(), h2.grad.numpy(), rtol=1e-5, atol=1e-6 * float(h2.grad.abs().max()))
    np.testing.assert_allclose(x1.grad.numpy(), x2.grad.numpy(), rtol=1e-4, atol=1e-6 * float(x2.grad.abs().max()))


# --------------------------------------------------------------------------- the custom op for torch.compile

def _route_op_loss(route_fn, x, cfg, gw, **call):
    idx, w, aux = route_fn(x, cfg, **call)[:3]
    return idx, w, aux, (w.double() * gw).sum() + 1.5 * aux


@pytest.mark.parametrize("cf,mask", [(None, False), (0.75, True)])
def test_route_op_equals_route_eagerly_and_under_torch_compile(cf, mask):
    from moe_router.torch import route_op

    g = torch.Generator().manual_seed(1)
    T, E, k = 96, 8, 2
    x = torch.randn(T, E, dtype=torch.float64, generator=g)
    gw = torch.randn(T, k, dtype=torch.float64, generator=g)
    call = dict(token_mask=torch.rand(T, generator=g) > 0.25) if mask else {}
    cfg = mr.RouterConfig(num_experts=E, top_k=k, capacity_factor=cf, normalize_weights=True,
                          load_balance_loss_coeff=0.3, router_z_loss_coeff=0.01, jitter_eps=0.1)
    grads = []
    outputs = []
    compiled = torch.compile(lambda a: _route_op_loss(route_op, a, cfg, gw, step=3, **call), backend="aot_eager",
                             fullgraph=True)  # fullgraph: a graph break would be an error
    for fn in (lambda a: _route_op_loss(route, a, cfg, gw, step=3, **call),
               lambda a: _route_op_loss(route_op, a, cfg, gw, step=3, **call), compiled):
        a = x.clone().requires_grad_()
        idx, w, aux, loss = fn(a)
        loss.backward()
        outputs.append((idx, w, aux))
        grads.append(a.grad)
    for (idx, w, aux), grad in zip(outputs[1:], grads[1:]):
        torch.testing.assert_close(idx, outputs[0][0], rtol=0, atol=0)
        torch.testing.assert_close(w, outputs[0][1], rtol=0, atol=0)
        torch.testing.assert_close(aux, outputs[0][2], rtol=0, atol=0)
        torch.testing.assert_close(grad, grads[0], rtol=0, atol=0)
    assert grads[0].abs().max() > 0


def test_route_op_passes_torch_library_opcheck():
    from moe_router.torch import route_op

    cfg = mr.RouterConfig(num_experts=8, top_k=2, load_balance_loss_coeff=0.1)
    route_op(torch.randn(4, 8), cfg)  # registers the configuration
    x = torch.randn(32, 8, dtype=torch.float64, requires_grad=True)
    # test_aot_dispatch_dynamic is left out: torch's harness adds the int64 expert_indices
    # into a float accumulator and fails before reaching the op; the torch.compile test above
    # runs the op through AOT autograd itself.
    torch.library.opcheck(torch.ops.moe_router.route.default, (x, repr(cfg), True, 0, None, None),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    with pytest.raises(mr.ConfigTypeError, match="config"):
        route_op(x, {"num_experts": 8})
