"""The base install (decoder, preprocessing, datasets, runtime) must work where TensorFlow is absent."""

import subprocess
import sys
import textwrap

from conftest import BLOCK_TENSORFLOW


def test_base_package_runs_with_tensorflow_blocked(tmp_path):
    code = BLOCK_TENSORFLOW + textwrap.dedent(
        """
        import sys, json
        import numpy as np
        import cxr_edge, cxr_edge.runtime, cxr_edge.export, cxr_edge.decision, cxr_edge.manifest
        from cxr_edge.synthetic import write_synthetic_dataset
        from cxr_edge.data import scan_dataset, split_dataset
        from cxr_edge.data.loading import load_images
        from cxr_edge.preprocess import PreprocessSpec
        d = write_synthetic_dataset(sys.argv[1], per_class=4, sizes=(64,))
        ds = scan_dataset(d)
        split_dataset(ds)
        res = load_images([i.path for i in ds.items], PreprocessSpec(32, 32, 'tf'))
        assert res.x.shape == (12, 32, 32, 1), res.x.shape
        from cxr_edge.errors import MissingExtraError
        from cxr_edge.train.trainer import TrainConfig, train
        try:
            train(TrainConfig(), d, sys.argv[1] + '-out')
        except MissingExtraError as e:
            assert "pip install 'cxr-edge[train]'" in str(e), e
        else:
            raise SystemExit('training ran without TensorFlow')
        assert not any(m.startswith('tensorflow') for m in sys.modules)
        print('OK')
        """
    )
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "d")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("OK")
