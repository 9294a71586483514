(* Torture's worker loop on a Shmpool_netmcore pool (by res_id): the
   Netmcore suites' [api]. Apart from Torture so that the shmpool-only
   suites do not link netmulticore. *)

module M = Shmpool_netmcore.Netmcore_mempool

let netmcore_api pool =
  {
    Torture.alloc = M.alloc_mem pool;
    free = M.free_mem pool;
    size = M.size_mem pool;
    is_oom = (function M.Out_of_pool_memory -> true | _ -> false);
    flush = (fun () -> Shmpool.flush_cache (Shmpool_netmcore.shmpool pool));
  }
