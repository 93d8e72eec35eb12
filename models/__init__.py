"""Networks and their checkpoint loaders, one file per family; each file can be imported on its own.

    safe_load.py  reading checkpoints from the internet without running them (restricted unpickling), and
                  strict loading (every key and shape checked)
    drakes.py     DRAKES's DNA release: the pretrained MDLM's CNN denoiser and the gReLU oracles' loaders
    grelu.py      gReLU's EnformerModel (the oracles' network) in plain torch, with gReLU's parameter names
    sedd.py       SEDD's score network and its published checkpoints
    gpt2.py       the text path's GPT-2 reward models and generative-perplexity judge
    golden/       upstream networks' own outputs and key lists, for the tests (golden/README.md)
"""
