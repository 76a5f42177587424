"""Calibration: run the float model over data and turn what it shows into quantization decisions.

``data`` checks and batches the calibration inputs; ``collect`` runs the model once and gathers statistics
(``histogram``); ``placement`` says which activations get quantized; ``ranges`` and ``asq`` choose each one's steps
(``activations`` is that whole stage); ``result`` is what the stage hands on. The two bias corrections use the same
data: ``bias_analytic`` from the float input means, ``bias_measured`` from a simulation of the quantized model.
"""
