"""Text generation, one concern a module (each unit-tested without a server):

    params          a request's checks: SamplingParams, chat messages
    chat_template   the tokenizer's chat template, prompt -> token ids, EOS ids
    sampling        the next token from logits (penalties, temperature, top-k, top-p)
    detokenize      token ids -> complete text, stop strings
    engine          the continuous-batching engine over the exported decoder
    driver          the request driver the Triton model hands requests to
"""
