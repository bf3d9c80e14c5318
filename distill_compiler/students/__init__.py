"""The two students, side by side, and what they share.

    classifier/  encoder classifier (task classify): model, train, kd_loss, export, evaluate
    causal/      causal LM (tasks extract, agent): base, data, train, export, evaluate
    device       which torch device trains
    quantize     weight quantization of exported ONNX graphs
    quiet        keeping third-party chatter out of `distill compile` output
    processes    rank and barrier of a multi-process (`accelerate launch`) run

The train, export and evaluate stages dispatch by task to `classifier` or `causal` the same way.
"""
