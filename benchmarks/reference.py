"""Hand-written train steps, as a JAX user writes them without kdvae.

One ``jax.jit`` step per workload of ``benchmarks/steps.py``, over a plain pytree of
parameters (a list of ``(kernel, bias)`` pairs), ``optax.adam`` and ``jax.random``:
the same network, loss, data gather and PRNG use as kdvae's step, and nothing else
(no metric sums, no NNX graph, no sharding constraints). ``benchmarks/steps.py
--overhead`` times them against kdvae's steps in interleaved rounds.

``make(step)`` returns ``(run, state)``: ``run(state, data, order, index,
key) -> (state, loss)``, jitted with the state donated, as kdvae's step is.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

T, ALPHA = 4.0, 0.5  # KD's defaults in kdvae.distill.DEFAULT_HYPERPARAMETERS


def dense(key, sizes):
    """``[(kernel, bias)]`` for ``sizes[0] -> ... -> sizes[-1]``, LeCun-normal kernels."""
    keys = jax.random.split(key, len(sizes) - 1)
    init = jax.nn.initializers.lecun_normal()
    return [(init(k, (a, b)), jnp.zeros(b)) for k, a, b in zip(keys, sizes[:-1], sizes[1:])]


def dropout(key, x, rate):
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0.0)


def mlp(params, x, key=None, input_rate=0.0, hidden_rate=0.0):
    keys = [None] * len(params) if key is None else list(jax.random.split(key, len(params)))
    x = dropout(keys[0], x.reshape(x.shape[0], -1), input_rate)
    for (w, b), k in zip(params[:-1], keys[1:]):
        x = dropout(k, jax.nn.relu(x @ w + b), hidden_rate)
    w, b = params[-1]
    return x @ w + b


def cnn_params(key):
    k1, k2, k3 = jax.random.split(key, 3)
    init = jax.nn.initializers.lecun_normal()
    convs = [(init(k1, (3, 3, 1, 32)), jnp.zeros(32)), (init(k2, (3, 3, 32, 64)), jnp.zeros(64))]
    return convs + dense(k3, [7 * 7 * 64, 128, 10])


def cnn(params, x, key=None):
    x = x.reshape(x.shape[0], 28, 28, 1)
    for w, b in params[:2]:
        x = jax.lax.conv_general_dilated(
            x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        x = jax.nn.relu(x + b)
        x = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
    (w1, b1), (w2, b2) = params[2:]
    x = jax.nn.relu(x.reshape(x.shape[0], -1) @ w1 + b1)
    return dropout(key, x, 0.5) @ w2 + b2


def cross_entropy(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def kd(student, teacher, labels):
    """``alpha CE + (1 - alpha) T^2 KL(softmax(teacher / T) || softmax(student / T))``."""
    log_p, log_q = jax.nn.log_softmax(teacher / T), jax.nn.log_softmax(student / T)
    kl = jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1).mean()
    return ALPHA * cross_entropy(student, labels) + (1 - ALPHA) * T**2 * kl


def vae_params(key):
    k = jax.random.split(key, 5)
    return {
        "encoder": dense(k[0], [784, 500]),
        "mean": dense(k[1], [500, 20]),
        "logvar": dense(k[2], [500, 20]),
        "decoder": dense(k[3], [20, 500, 784]),
    }


def neg_elbo(params, images, key):
    """Dynamic binarization, one reparameterized sample, Bernoulli decoder."""
    binarize_key, sample_key = jax.random.split(key)
    x = jax.random.bernoulli(binarize_key, images).astype(jnp.float32)
    ((w, b),) = params["encoder"]
    h = jax.nn.relu(x @ w + b)
    mean = h @ params["mean"][0][0] + params["mean"][0][1]
    logvar = h @ params["logvar"][0][0] + params["logvar"][0][1]
    z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(sample_key, mean.shape)
    logits = mlp(params["decoder"], z)
    log_px = -optax.sigmoid_binary_cross_entropy(logits, x).sum(-1)
    kl = 0.5 * jnp.sum(jnp.exp(logvar) + mean**2 - 1.0 - logvar, axis=-1)
    return jnp.mean(kl - log_px)


def make(step: str, *, teacher=None):
    """``(run, state)`` of the hand-written ``step`` (a name of ``steps.STEPS``);
    ``teacher``: the live teacher's ``[(kernel, bias)]`` (default a fresh one). The
    shapes come with the data ``run`` is given."""
    key = jax.random.key(0)
    if step == "vae":
        params = vae_params(key)

        def loss(params, batch, key):
            return neg_elbo(params, batch["images"].reshape(-1, 784) / 255.0, key)

    elif step == "cnn_teacher":
        params = cnn_params(key)

        def loss(params, batch, key):
            logits = cnn(params, batch["images"] / 255.0, key)
            return cross_entropy(logits, batch["labels"])

    elif step == "teacher":
        params = dense(key, [784, 1200, 1200, 10])

        def loss(params, batch, key):
            logits = mlp(params, batch["images"] / 255.0, key, 0.2, 0.5)
            return cross_entropy(logits, batch["labels"])

    else:  # the 784-800-800-10 student, alone or distilled
        params = dense(key, [784, 800, 800, 10])
        if teacher is None:
            teacher = dense(jax.random.key(1), [784, 1200, 1200, 10])

        def loss(params, batch, key):
            x = batch["images"] / 255.0
            logits = mlp(params, x)
            if step == "distill_cached":
                return kd(logits, batch["teacher_logits"], batch["labels"])
            if step == "distill_live":
                return kd(logits, jax.lax.stop_gradient(mlp(teacher, x)), batch["labels"])
            return cross_entropy(logits, batch["labels"])

    tx = optax.adam(1e-3)

    def run(state, data, order, index, epoch_key):
        params, opt_state = state
        rows = order[index]
        batch = {name: array[rows] for name, array in data.items()}
        value, grads = jax.value_and_grad(loss)(params, batch, jax.random.fold_in(epoch_key, index))
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        if step == "teacher":  # max-norm 3.5 on each unit's incoming weights
            params = [(w * jnp.minimum(1.0, 3.5 / (jnp.linalg.norm(w, axis=0) + 1e-12)), b)
                      for w, b in params]  # fmt: skip
        return (params, opt_state), value

    return jax.jit(run, donate_argnums=0), (params, tx.init(params))
