"""transformers' greedy continuation, compared only up to its first near-tie: the reference the
end-to-end tests (tests/python) and the device check (python/gpu_check.py) hold Caravan's greedy
tokens against."""

GREEDY_MARGIN = 1e-3


def hf_greedy(model, ids, n, **generate_options):
    """transformers' greedy continuation of `ids` (a list of token ids) by `model`, on the model's
    device: the tokens, and how many of them follow steps whose top-2 logit margin is at least
    GREEDY_MARGIN (past a near-tie, f32 summation order may pick the other token, so only that
    many are compared). `generate_options` go to `generate` (its logits processors:
    `repetition_penalty`, ...); the margins are those of the processed scores."""
    import torch  # here, so that importing the tests' conftest does not load torch

    with torch.no_grad():
        out = model.generate(torch.tensor([ids], device=model.device), max_new_tokens=n, do_sample=False,
                             output_scores=True, return_dict_in_generate=True, pad_token_id=0, **generate_options)
    tokens = out.sequences[0, len(ids):].tolist()
    safe = 0
    for scores in out.scores:
        top = torch.topk(scores[0].float(), 2).values
        if top[0] - top[1] < GREEDY_MARGIN:
            break
        safe += 1
    return tokens, safe
