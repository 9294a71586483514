(* Netmcore_mutex on shmpool: a robust, process-shared pthread mutex in a
   string of the shared heap (see sync.ml). Owners are threads. A mutex
   whose owner died (even by SIGKILL) is taken over by the next locker:
   its [lock] succeeds, and [recoveries] counts such takeovers. *)

type mutex_type = [ `Normal | `Errorcheck | `Recursive ]
type mutex = string

let dummy () : mutex = String.make Sync.mutex_bytes '\000'

let create m (t : mutex_type) : mutex =
  let s = Sync.alloc m Sync.mutex_bytes in
  let c = Sync.mutex_init s (match t with `Normal -> 0 | `Errorcheck -> 1 | `Recursive -> 2) in
  if c < 0 then Sync.fail_code "Netmcore_mutex.create" c;
  s

let lock mx =
  let c = Sync.mutex_lock mx in
  if c < 0 then
    if c = Sync.e_dummy then failwith "Netmcore_mutex.lock: dummy mutex"
    else if c = Sync.e_deadlock then failwith "Netmcore_mutex.lock: already locked by this process"
    else Sync.fail_code "Netmcore_mutex.lock" c

let unlock mx =
  let c = Sync.mutex_unlock mx in
  if c < 0 then
    if c = Sync.e_dummy then failwith "Netmcore_mutex.unlock: dummy mutex"
    else if c = Sync.e_not_owner then failwith "Netmcore_mutex.unlock: not locked by this process"
    else Sync.fail_code "Netmcore_mutex.unlock" c

let destroy mx = ignore (Sync.sync_destroy mx)

let recoveries mx =
  let c = Sync.mutex_recoveries mx in
  if c < 0 then failwith "Netmcore_mutex.recoveries: dummy mutex";
  c
let raw (m : mutex) : string = m
