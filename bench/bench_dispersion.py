"""What does the dispersion loss add to a training step?

Builds a GPT-2 from config (no hub; random weights, random token ids), then times,
interleaved in one run so machine noise hits every arm alike:

* base:      forward + backward of the LM loss (`output_hidden_states=True`);
* with loss: the same step with `lambda * dispersion_over_layers(...)` added;
* kernel:    forward + backward of the dispersion term alone, on detached copies
             of the hidden states.

and prints the medians and the ratios kernel / base and (with loss - base) / base,
for each `max_tokens` asked. Goal: the dispersion term costs <= 10% of a step.

    python bench/bench_dispersion.py                      # GPT-2 small, T=512, batch 1
    python bench/bench_dispersion.py --batch 2 --variant orthogonalization
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from scaling.dispersion import VARIANTS, dispersion_over_layers
from scaling.dispersion_spec import resolve_layers


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-layer", type=int, default=12)
    parser.add_argument("--n-embd", type=int, default=768)
    parser.add_argument("--n-head", type=int, default=12)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--variant", default="angular_spread", choices=VARIANTS)
    parser.add_argument("--layers", default="all")
    parser.add_argument("--max-tokens", default="256,none", help="comma list; 'none' = every token")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    return parser.parse_args()


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=args.n_layer,
        n_embd=args.n_embd,
        n_head=args.n_head,
        n_positions=max(args.seq, 512),
        vocab_size=50257,
    )
    model = GPT2LMHeadModel(config).train()
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq))
    layers = resolve_layers(args.layers, config.n_layer)
    max_tokens_list = [None if m.strip().lower() == "none" else int(m) for m in args.max_tokens.split(",")]
    generator = torch.Generator().manual_seed(0)

    def base_step() -> None:
        out = model(ids, labels=ids, output_hidden_states=True)
        out.loss.backward()
        model.zero_grad(set_to_none=True)

    def dispersion_step(max_tokens: int | None) -> None:
        out = model(ids, labels=ids, output_hidden_states=True)
        disp = dispersion_over_layers(
            out.hidden_states, layers, args.variant, max_tokens=max_tokens, generator=generator
        )
        (out.loss + 0.1 * disp).backward()
        model.zero_grad(set_to_none=True)

    with torch.no_grad():
        states = [h.detach() for h in model(ids, output_hidden_states=True).hidden_states]

    def kernel_only(max_tokens: int | None) -> None:
        leaves = [h.clone().requires_grad_(True) for h in states]
        disp = dispersion_over_layers(leaves, layers, args.variant, max_tokens=max_tokens, generator=generator)
        disp.backward()

    arms = {"base": base_step}
    for m in max_tokens_list:
        arms[f"step+disp[max_tokens={m}]"] = lambda m=m: dispersion_step(m)
        arms[f"kernel[max_tokens={m}]"] = lambda m=m: kernel_only(m)

    for fn in arms.values():  # warm-up: allocator, thread pools
        fn()
    times: dict[str, list[float]] = {name: [] for name in arms}
    for _ in range(args.repeats):
        for name, fn in arms.items():
            times[name].append(timed(fn))
    median = {name: statistics.median(ts) for name, ts in times.items()}

    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"GPT-2 n_layer={config.n_layer} n_embd={config.n_embd} ({n_params / 1e6:.0f}M params), "
        f"batch={args.batch}, T={args.seq}, variant={args.variant}, layers={args.layers} "
        f"({len(layers)} hidden states), threads={torch.get_num_threads()}, repeats={args.repeats}"
    )
    base = median["base"]
    print(f"  base step (fwd+bwd, CE)          {base * 1e3:9.1f} ms")
    for m in max_tokens_list:
        step = median[f"step+disp[max_tokens={m}]"]
        kernel = median[f"kernel[max_tokens={m}]"]
        print(
            f"  max_tokens={str(m):>4}: step+disp {step * 1e3:9.1f} ms  (step-base)/base = {(step - base) / base:6.1%}"
            f"   kernel fwd+bwd {kernel * 1e3:7.1f} ms  kernel/base = {kernel / base:6.1%}"
        )


if __name__ == "__main__":
    main()
