"""Pass infrastructure, apart from the passes: the pass contract (:mod:`.base`), the manager and
its instruments (:mod:`.manager`), the result cache (:mod:`.cache`), the budget guard run after
every pass past ``allocate`` (:mod:`.budget_guard`) and the stored-bytes accounting the budget,
the report and the artifact share (:mod:`.storage`), the per-layer progress clock of long passes
(:mod:`.layer_clock`) and the per-layer tasks ``compile --ray`` runs on workers
(:mod:`.remote_tasks`)."""
