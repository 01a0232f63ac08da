"""Site workflows built on the runtime: calibrating an artifact's operating point on a site's own images and
evaluating an artifact on a labelled split; front ends call them, the runtime never does."""
