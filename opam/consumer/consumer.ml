(* Downstream smoke test of the installed shmpool libraries. *)

(* The drop-in must have OCamlnet's exact signature. *)
module _ : module type of Netmcore_mempool = Shmpool_netmcore.Netmcore_mempool

let () =
  (* Shmpool: a 1 MiB anonymous pool. *)
  let p = Shmpool.create (1 lsl 20) in
  let m = Shmpool.alloc p 4096 in
  Shmpool.free p m;
  let (_ : Shmpool.stats) = Shmpool.stats p in
  print_endline "consumer: Shmpool create/alloc/free/stats ok";
  (* Shmpool_netmcore: the OCamlnet API, in the master, no workers. *)
  let module M = Shmpool_netmcore.Netmcore_mempool in
  let id = M.create_mempool (1 lsl 20) in
  let total, free, contiguous = M.stats id in
  Printf.printf "consumer: Netmcore_mempool stats total=%d free=%d contiguous=%d\n"
    total free contiguous;
  M.unlink_mempool id;
  print_endline "consumer: OK"
