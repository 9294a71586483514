module Netmcore_mempool = Mempool

let shmpool = Mempool.shmpool

module Netmcore_heap = Heap
module Netmcore_ref = Sref
module Netmcore_array = Sarray
module Netmcore_matrix = Smatrix
module Netmcore_buffer = Sbuffer
module Netmcore_hashtbl = Shashtbl
module Netmcore_queue = Squeue
module Netmcore_mutex = Smutex
module Netmcore_sem = Ssem
module Netmcore_condition = Scondition

module Struct_internal = struct
  let commit_hook = Commit_point.hook
  let sync_crash_at = Sync.crash_at

  let mutex_set_holder mx pid start_delta =
    let r = Sync.test_set_holder (Smutex.raw mx) pid start_delta in
    if r < 0 then Sync.fail_code "Struct_internal.mutex_set_holder" r
end

module Heap_internal = struct
  let modify_repairing = Heap.modify_repairing
end

(* Runs a worker's process function, then gives this process's cached blocks
   back, whether it returned or raised: Netmcore delivers the result (and
   [join] returns) before the worker exits, which is when Shmpool would give
   them back otherwise. *)
let flushing f x = Fun.protect ~finally:Shmpool.flush_caches (fun () -> f x)

module Netmcore = struct
  include Netmcore

  let def_process f = Netmcore.def_process (flushing f)
end

module Netmcore_process = struct
  include Netmcore_process

  let def_process f = Netmcore_process.def_process (flushing f)
end
