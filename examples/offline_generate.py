"""Offline batch generation with jaxserve's LLM API (runs on the built-in demo model by default).

    python examples/offline_generate.py [MODEL_DIR]
"""

import sys

from jaxserve import LLM, SamplingParams
from jaxserve.demo import ensure_demo_model


def main() -> None:
    model = sys.argv[1] if len(sys.argv) > 1 else ensure_demo_model()
    llm = LLM(model=model, max_model_len=512, max_num_seqs=16, max_num_batched_tokens=128)
    prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time"]
    greedy = SamplingParams(temperature=0.0, max_tokens=24)
    for out in llm.generate(prompts, greedy):
        print(repr(out.prompt), "->", repr(out.outputs[0].text))
    sampled = SamplingParams(temperature=0.8, top_p=0.95, max_tokens=24, n=2, seed=1, logprobs=2)
    for out in llm.generate(prompts[:1], sampled):
        for c in out.outputs:
            print(c.index, repr(c.text), f"cumulative logprob {c.cumulative_logprob:.2f}")
    chat = [{"role": "user", "content": "Say hello."}]
    print(repr(llm.chat(chat, greedy)[0].outputs[0].text))
    print(llm.stats())


if __name__ == "__main__":
    main()
