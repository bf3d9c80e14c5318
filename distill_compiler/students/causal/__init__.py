"""The causal-LM student (tasks extract and agent): TRL SFT/GKD with LoRA, a KV-cache ONNX
decoder, evaluation and cascade fitting through the runtime's constrained decoder."""
