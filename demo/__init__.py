"""The mmllm web demo: a Gradio multimodal chat over ``mmllm.load`` and ``model.generate``.

``python -m demo --model tiny`` (or ``mmllm demo``) serves it; ``demo.app.build_demo(model)``
builds it without launching. The chat logic is plain Python in ``mmllm.chat``, shared with the ``mmllm`` command line.
Gradio is imported only by ``demo.app``, so ``demo.serve`` can point Gradio's upload
folder at a private temp dir before Gradio is imported.
"""
