"""LLM and gold judges, shared by Table 1 and the benchmarks.

    judges.py           get_judge: one interface for the gold scorer, an OpenAI-compatible endpoint and a local
                        llama.cpp server; write_calls, the record of what a judging job asked
    client.py           the OpenAI-compatible client: retries, the API key from the environment, the cache
    cache.py            every judge call on disk as soon as it returns
    config.py           a judge's config block resolved from the schema's defaults; its label
    constraint.py       verdicts forced by a grammar or structured outputs (`constrain: true`)
    llamacpp_server.py  a llama_cpp.server on a free loopback port, always stopped
    validity.py         an LLM judge's verdicts on Table 1's answer pairs against the gold verdicts
"""
