"""Structured outputs with jaxserve's LLM API: a JSON schema, a regex and a choice (runs on the
built-in random-weight demo model by default: only the constraint makes its output valid).

    python examples/structured_outputs.py [MODEL_DIR]
"""

import json
import sys

from jaxserve import LLM, SamplingParams, StructuredOutputsParams
from jaxserve.demo import ensure_demo_model

PERSON = {"type": "object",
          "properties": {"name": {"type": "string", "maxLength": 10},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"], "additionalProperties": False}


def main() -> None:
    model = sys.argv[1] if len(sys.argv) > 1 else ensure_demo_model()
    llm = LLM(model=model, max_model_len=256, max_num_seqs=4, max_num_batched_tokens=64)
    for so in (StructuredOutputsParams(json=PERSON),
               StructuredOutputsParams(regex=r"\d{3}-[A-Z]{2}"),
               StructuredOutputsParams(choice=["positive", "negative", "neutral"])):
        params = SamplingParams(temperature=0.8, seed=0, max_tokens=64, structured_outputs=so)
        text = llm.generate(["Describe a person:"], params, use_tqdm=False)[0].outputs[0].text
        print(f"{so.kind:7} -> {text!r}")
    person = json.loads(llm.generate(["Who?"], SamplingParams(
        max_tokens=64, structured_outputs={"json": PERSON}), use_tqdm=False)[0].outputs[0].text)
    print("parsed:", person)


if __name__ == "__main__":
    main()
