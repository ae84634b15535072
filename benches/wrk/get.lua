-- GET pass-through (static request; statuses counted like every scenario).
count_statuses = true
dofile(os.getenv("WRK_LIB"))
wrk.method = "GET"
