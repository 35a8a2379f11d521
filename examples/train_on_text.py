"""Train a character-level language model on your own text file, then sample from it."""
import argparse

import jax

from ssmjax.data import TextTask
from ssmjax.models import SequenceModel, generate
from ssmjax.train import TrainConfig, train

parser = argparse.ArgumentParser()
parser.add_argument("text_file", help="a UTF-8 text file, e.g. tinyshakespeare.txt")
parser.add_argument("--steps", type=int, default=1000)
parser.add_argument("--out", default="runs/char_lm")
args = parser.parse_args()

task = TextTask.from_file(args.text_file, seq_len=128, batch_size=32)  # first 90% train, last 10% validation
model = SequenceModel(d_model=128, n_layers=4, mixers="gated_deltanet", vocab_size=task.vocab_size)
config = TrainConfig(steps=args.steps, lr=3e-3, warmup_steps=100, eval_every=500)
run = train(model, task, config, args.out, resume=True)  # Ctrl-C or SIGTERM saves; rerun to continue
if run.results["status"] != "done":
    raise SystemExit(run.results["message"])
scores = run.results["eval"]
print(f"validation: {scores['loss']:.3f} nats/char = {scores['bits_per_char']:.3f} bits/char")

prompt = task.val_batches[0].inputs[:1, :32]  # [1, 32] token ids: the first validation characters
tokens, _ = generate(model, run.params, prompt, 200, jax.random.PRNGKey(0), temperature=0.8)
print(task.tokenizer.decode(prompt[0]) + task.tokenizer.decode(tokens[0]))
