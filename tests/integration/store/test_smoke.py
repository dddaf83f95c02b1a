from dragoman.store.api import JobSpec, Store


async def test_register_dispatch_complete(store: Store) -> None:
    r = await store.register_node("n1", conn="c1", max_concurrency=2, pools=["zh>en"])
    assert r.status == "registered"
    d = await store.dispatch(JobSpec(pool="zh>en", session_id="s1", utterance_index=0, tgt_lang="en", body="{}"))
    assert d.status == "assigned", d
    assert d.node == "n1" and d.attempt == 1
    c = await store.complete(d.job_id, "n1", 1, "completed", payload='{"x":1}')
    assert c.status == "completed", c
    assert [e.kind for e in c.effects] == ["outcome"]
    rep = await store.slot_report()
    assert rep["used"] == 0 and not rep["violations"]
