"""Text generation: request parameters, chat template, sampling, detokenizer + stop
strings, the continuous-batching engine, and the driver the Triton model hands requests to."""
