from bgem3_lib.progress import bars_disabled, tqdm


def test_env_forces_bars_off(monkeypatch):
    monkeypatch.setenv("TQDM_DISABLE", "1")
    assert bars_disabled()
    assert tqdm(range(2), disable=False).disable


def test_explicit_choice_kept_without_env(monkeypatch):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    assert not bars_disabled()
    assert tqdm(range(2), disable=True).disable
    bar = tqdm(range(2), disable=False)
    assert not bar.disable
    bar.close()
