"""The `edgeorch chain` command: argument handling and output around edgeorch.local.chain."""

from __future__ import annotations

import argparse
import json
import sys

from edgeorch.local.chain import ChainSpecError, hop_summary, parse_formats, parse_stages, start_chain
from edgeorch.models import adapter_for, load_config
from edgeorch.models.store import ModelStore, ModelStoreError
from edgeorch.models.tokenizer import load_tokenizer
from edgeorch.service.settings import CommonSettings
from edgeorch.transport.protocol import HopFailure


def run_chain_command(args: argparse.Namespace, store: ModelStore) -> int:
    """Run the prompt through the chain and print the answer; returns the exit code."""
    try:
        model_dir = store.path(args.model)
        adapter = adapter_for(load_config(model_dir))
        ranges = parse_stages(args.stages, adapter.num_units)
        options = parse_formats(args.format, len(ranges))
    except (ModelStoreError, ChainSpecError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    tokenizer = load_tokenizer(model_dir)
    print(f"starting {len(ranges)} workers for {args.model} stages {args.stages} ...", file=sys.stderr)
    # A checkpoint directory travels to the workers as its absolute path (they allow-list it).
    model = args.model if model_dir.parent == store.root else str(model_dir)
    chain = start_chain(
        model, ranges, model_store=store.root, threads=args.threads, log_dir=args.log_dir, options=options,
        token=CommonSettings().admin_token,  # the temporary workers guard their admin calls like any other
    )  # fmt: skip
    try:
        if adapter.is_decoder:
            result = _generate(chain, tokenizer, args)
            for hop, held in zip(result["hops"], chain.stage_bytes(), strict=False):
                hop.update(held)
        else:
            enc = tokenizer([args.prompt], return_tensors="pt")
            emb = chain.client.encode(enc["input_ids"], enc["attention_mask"])
            result = {"embedding": emb[0].tolist(), "dim": emb.shape[1]}
    except HopFailure as exc:
        print(f"error: the chain answered {exc.status} ({exc.kind}): {exc.detail}", file=sys.stderr)
        return 1
    finally:
        chain.close()
    if args.json:
        print(json.dumps(result))
    elif "text" in result:
        print(result["text"])
    else:
        print(json.dumps(result["embedding"]))
    return 0


def _generate(chain, tokenizer, args: argparse.Namespace) -> dict:
    messages = [{"role": "user", "content": args.prompt}]
    if tokenizer.chat_template:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)[
            "input_ids"
        ]
    else:
        ids = tokenizer(args.prompt)["input_ids"]
    stop = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    gen = chain.client.generate(list(ids), args.max_tokens, stop_ids=stop)
    return {
        "text": tokenizer.decode(gen.token_ids, skip_special_tokens=True),
        "token_ids": gen.token_ids,
        "prompt_tokens": len(ids),
        "prefill_ms": 1000 * gen.prefill_s,
        "decode_tokens_per_s": gen.decode_tokens_per_s,
        "hops": hop_summary(gen),
    }
