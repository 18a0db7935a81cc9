"""`python -m jaxcomp.main`, paused after logging one step until a file exists.

Tests start runs with it to deliver a signal at a known step, whatever the machine's
speed: every process of the run waits after its log call of step
`$JAXCOMP_TEST_PAUSE_AT` (process 0 has written the line by then) until the file
`$JAXCOMP_TEST_RESUME` exists. Arguments are jaxcomp.main's.
"""

import os
import time

from absl import app

from jaxcomp import main, training

PAUSE_AT = int(os.environ["JAXCOMP_TEST_PAUSE_AT"])
write = training.MetricsWriter.write


def write_then_pause(self, step, scalars):
    write(self, step, scalars)
    if step == PAUSE_AT and "total" in scalars:
        while not os.path.exists(os.environ["JAXCOMP_TEST_RESUME"]):
            time.sleep(0.01)


training.MetricsWriter.write = write_then_pause
app.run(main.main)
