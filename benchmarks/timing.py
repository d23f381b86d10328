"""Timing helpers shared by the benchmarks."""

import time

import tfhybrid as th


class StepTimer(th.keras.callbacks.Callback):
    """Wall time of every training batch, in seconds (`times`)."""

    def __init__(self):
        super().__init__()
        self.times = []

    def on_train_batch_begin(self, batch, logs=None):
        self._start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self.times.append(time.perf_counter() - self._start)
