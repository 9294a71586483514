(* Single-process profile target for the shared structures (not part of
   `make bench`): N hashtable adds or replaces on ours or OCamlnet's,
   chosen by argv: prof_structs.exe (ours|orig) (add|replace|find) N *)
let () =
  let impl = Sys.argv.(1) and op = Sys.argv.(2) and n = int_of_string Sys.argv.(3) in
  let t0 = Unix.gettimeofday () in
  (if impl = "ours" then begin
     let module T = Shmpool_netmcore.Netmcore_hashtbl in
     let pool = Shmpool_netmcore.Netmcore_mempool.create_mempool (512 * 1024 * 1024) in
     Fun.protect ~finally:(fun () -> Shmpool_netmcore.Netmcore_mempool.unlink_mempool pool) (fun () ->
         let t = T.create pool () in
         match op with
         | "add" -> for i = 1 to n do T.add t i i done
         | "replace" -> for i = 1 to n do T.replace t (i land 1023) i done
         | _ -> for i = 1 to 1000 do T.add t i i done; for i = 1 to n do ignore (T.find_ro t ((i land 511) + 1)) done)
   end
   else begin
     let module T = Netmcore_hashtbl in
     let pool = Netmcore_mempool.create_mempool (512 * 1024 * 1024) in
     Fun.protect ~finally:(fun () -> Netmcore_mempool.unlink_mempool pool) (fun () ->
         let t = T.create pool () in
         match op with
         | "add" -> for i = 1 to n do T.add t i i done
         | "replace" -> for i = 1 to n do T.replace t (i land 1023) i done
         | _ -> for i = 1 to 1000 do T.add t i i done; for i = 1 to n do ignore (T.find_ro t ((i land 511) + 1)) done)
   end);
  let dt = Unix.gettimeofday () -. t0 in
  Printf.printf "%s %s: %.2f M/s\n" impl op (float n /. dt /. 1e6)
