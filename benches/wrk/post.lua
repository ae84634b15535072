-- Keyless POST, 1 KiB JSON body: pass-through (static request).
count_statuses = true
dofile(os.getenv("WRK_LIB"))
wrk.method = "POST"
wrk.body = body_1k
wrk.headers["Content-Type"] = "application/json"
