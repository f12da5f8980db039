"""Checks that transformers and PEFT load a run's exports with the run's own logits (launch/demo_real.sh).

    python launch/check_export.py RUN MERGED_HF_DIR PEFT_ADAPTER_DIR BASE_HF_DIR [QUESTION]

MERGED_HF_DIR is `flaxalign convert --from=RUN --format=hf`, PEFT_ADAPTER_DIR `--format=peft --merge_parent` and
BASE_HF_DIR the run's original base as an HF directory. The question is rendered with the export's chat template
(the one the run trained with), scored by the run (flaxalign) and by both exports (transformers, PEFT), and answered
greedily by the merged export. Exit 1 with one `flaxalign: error:` line when a logit differs by more than 2e-4.
Needs the parity extra (torch, transformers, peft).
"""

import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the comparison is float32 on the host, whatever accelerator is there
import jax
import numpy as np
import peft
import torch
import transformers

from flaxalign import sharding, weights
from flaxalign.models.apply import apply_lm

TOLERANCE = 2e-4  # float32 logits of a 30-layer model in two frameworks: 9.6e-5 measured on SmolLM2-135M


def main(run: str, merged: str, adapter: str, base: str, question: str = "What is 37 + 58?") -> int:
    tokenizer = transformers.AutoTokenizer.from_pretrained(merged)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    tokens = prompt["input_ids"].numpy().astype(np.int32)
    mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    with jax.set_mesh(mesh):
        config, params = weights.run_weights(run, mesh)
        ours = np.asarray(apply_lm(config, params, tokens, np.ones_like(tokens)))
    with torch.no_grad():
        merged_model = transformers.AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
        base_model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
        adapted = peft.PeftModel.from_pretrained(base_model, adapter).eval()
        worst = 0.0
        for name, model in (("merged HF export", merged_model), ("PEFT adapter on the base", adapted)):
            error = float(np.max(np.abs(model(**prompt).logits.numpy() - ours)))
            print(f"check_export: {name}: max |logit − run's logit| = {error:.2e} over {tokens.size} tokens")
            worst = max(worst, error)
        answer = merged_model.generate(**prompt, max_new_tokens=24, do_sample=False)[0, tokens.shape[1]:]
    print(f"check_export: transformers, greedy: {question!r} → {tokenizer.decode(answer, skip_special_tokens=True)!r}")
    if worst > TOLERANCE:
        print(f"flaxalign: error: an export's logits differ from {run}'s by {worst:.2e} (> {TOLERANCE}).",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    if len(sys.argv) not in (5, 6):
        sys.exit("usage: " + __doc__.strip().splitlines()[2].strip())
    sys.exit(main(*sys.argv[1:]))
