(* Probes of OCamlnet 4.1.9's Netmcore_heap / Netmcore_ref behaviour. *)
open Printf
let pool = Netmcore_mempool.create_mempool (4 * 1024 * 1024)
let ps () = let (t, f, c) = Netmcore_mempool.stats pool in sprintf "total=%d free=%d contig=%d" t f c
let show name f =
  match f () with
  | s -> printf "%-44s -> %s\n%!" name s
  | exception e -> printf "%-44s => exception %s\n%!" name (Printexc.to_string e)
let col v = match Netsys_mem.color (Obj.repr v) with
  | Netsys_mem.White -> "white" | Black -> "black" | Gray -> "gray" | Blue -> "blue"
(* run in a child (crash / hang isolation) *)
let in_child name secs f =
  flush_all ();
  match Unix.fork () with
  | 0 -> ignore (Unix.alarm secs); (try f () with e -> printf "%s => exception %s\n%!" name (Printexc.to_string e)); exit 0
  | pid -> (match snd (Unix.waitpid [] pid) with
      | Unix.WEXITED 0 -> ()
      | Unix.WEXITED n -> printf "%-44s => child exit %d\n%!" name n
      | Unix.WSIGNALED s -> printf "%-44s => child killed by signal %d%s\n%!" name s
                               (if s = Sys.sigalrm then " (SIGALRM: hung)" else if s = Sys.sigsegv then " (SIGSEGV)" else "")
      | Unix.WSTOPPED _ -> ())

type r = { mutable a : int; mutable l : int list; mutable s : string }
class obj = object method m = 1 end

let () =
  printf "pool after create: %s\n" (ps ());
  show "create_heap int root" (fun () -> ignore (Netmcore_heap.create_heap pool 4096 42); "ok");
  show "minimum_size 42" (fun () -> string_of_int (Netmcore_heap.minimum_size 42));
  show "minimum_size (ref 1)" (fun () -> string_of_int (Netmcore_heap.minimum_size (ref 1)));
  show "minimum_size [1..10]" (fun () -> string_of_int (Netmcore_heap.minimum_size (List.init 10 Fun.id)));
  show "minimum_size (String.make 100)" (fun () -> string_of_int (Netmcore_heap.minimum_size (String.make 100 'x')));
  show "minimum_size closure" (fun () -> string_of_int (Netmcore_heap.minimum_size (fun x -> x + 1)));
  let before = ps () in
  let h = Netmcore_heap.create_heap pool 100 { a = 1; l = [ 1; 2 ]; s = "abc" } in
  printf "pool before heap: %s\nafter create_heap 100: %s\n" before (ps ());
  printf "root colour: %s; root.l colour: %s\n" (col (Netmcore_heap.root h)) (col (Netmcore_heap.root h).l);
  printf "debug_info:\n%s" (Netmcore_heap.debug_info h);
  let cases : (string * Obj.t) list = [
    "closure", Obj.repr (fun x -> x + 1);
    "object", Obj.repr (new obj);
    "in_channel", Obj.repr stdin;
    "int32", Obj.repr 5l; "int64", Obj.repr 5L; "nativeint", Obj.repr 5n;
    "bigarray", Obj.repr (Bigarray.Array1.create Bigarray.char Bigarray.c_layout 10);
    "abstract", Obj.new_block Obj.abstract_tag 2;
    "lazy unforced", Obj.repr (lazy (print_string ""));
    "lazy forced", Obj.repr (let l = lazy 3 in ignore (Lazy.force l); l);
    "float", Obj.repr 3.5; "float array", Obj.repr [| 1.; 2. |];
    "empty array", Obj.repr [||]; "empty string", Obj.repr "";
    "exception", Obj.repr Not_found; "exn with arg", Obj.repr (Failure "x");
    "heap value", Obj.repr h;
    "weak", Obj.repr (Weak.create 3);
    "Hashtbl", Obj.repr (Hashtbl.create 3);
    "Buffer", Obj.repr (Buffer.create 3);
    "mutex dummy", Obj.repr (Netmcore_mutex.dummy ());
    "cyclic list", Obj.repr (let rec l = 1 :: 2 :: l in l);
  ] in
  List.iter (fun (n, v) ->
      in_child ("add " ^ n) 3 (fun () -> let h = Netmcore_heap.create_heap pool 4096 (ref 0) in
      show ("add " ^ n) (fun () ->
          Netmcore_heap.modify h (fun m ->
              let c = Netmcore_heap.add m v in
              sprintf "ok, colour %s, tag %d" (if Obj.is_block c then col c else "imm") (if Obj.is_block c then Obj.tag c else -1)))))
    cases;
  show "add cyclic: cycle kept" (fun () -> Netmcore_heap.modify h (fun m ->
      let rec l = 1 :: 2 :: l in let c = Netmcore_heap.add m l in
      string_of_bool (List.tl (List.tl c) == c)));
  show "add sharing kept" (fun () -> Netmcore_heap.modify h (fun m ->
      let x = [ 1 ] in let c = Netmcore_heap.add m (x, x) in string_of_bool (fst c == snd c)));
  show "add_immutable shares heap parts" (fun () -> Netmcore_heap.modify h (fun m ->
      let x = Netmcore_heap.add m [ 1; 2 ] in let y = Netmcore_heap.add_immutable m (0 :: x) in
      let z = Netmcore_heap.add m (0 :: x) in
      sprintf "add_immutable tail shared=%b, add tail shared=%b" (List.tl y == x) (List.tl z == x)));
  show "add_uniform_array 0" (fun () -> Netmcore_heap.modify h (fun m ->
      let a = Netmcore_heap.add_uniform_array m 0 'x' in sprintf "len %d, == [||] %b" (Array.length a) (Obj.repr a == Obj.repr [||])));
  show "add_uniform_array -1" (fun () -> Netmcore_heap.modify h (fun m -> ignore (Netmcore_heap.add_uniform_array m (-1) 1); "ok"));
  show "add_uniform_array 3 [1] shared" (fun () -> Netmcore_heap.modify h (fun m ->
      let a = Netmcore_heap.add_uniform_array m 3 [ 1 ] in string_of_bool (a.(0) == a.(2))));
  show "add_uniform_array 3 2.5 (float array?)" (fun () -> Netmcore_heap.modify h (fun m ->
      let a = Netmcore_heap.add_uniform_array m 3 2.5 in sprintf "tag %d" (Obj.tag (Obj.repr a))));
  show "add_init_array 0" (fun () -> Netmcore_heap.modify h (fun m ->
      let a = Netmcore_heap.add_init_array m 0 (fun _ -> 1) in sprintf "len %d" (Array.length a)));
  show "add_init_array 3 float" (fun () -> Netmcore_heap.modify h (fun m ->
      let a = Netmcore_heap.add_init_array m 3 float_of_int in sprintf "tag %d, %g" (Obj.tag (Obj.repr a)) a.(2)));
  show "add_string 0" (fun () -> Netmcore_heap.modify h (fun m -> sprintf "len %d" (String.length (Netmcore_heap.add_string m 0))));
  show "add_string 5 contents" (fun () -> Netmcore_heap.modify h (fun m -> String.escaped (Netmcore_heap.add_string m 5)));
  show "add_string -1" (fun () -> Netmcore_heap.modify h (fun m -> ignore (Netmcore_heap.add_string m (-1)); "ok"));
  show "add_some private" (fun () -> Netmcore_heap.modify h (fun m ->
      let x = [ 1 ] in match Netmcore_heap.add_some m x with Some y -> sprintf "x not copied: %b" (y == x) | None -> "none"));
  show "add int" (fun () -> Netmcore_heap.modify h (fun m -> string_of_int (Netmcore_heap.add m 7)));
  show "escaped mutator add" (fun () ->
      let mm = Netmcore_heap.modify h (fun m -> m) in ignore (Netmcore_heap.add mm [ 1 ]); "ok");
  show "escaped mutator add_string" (fun () ->
      let mm = Netmcore_heap.modify h (fun m -> m) in ignore (Netmcore_heap.add_string mm 3); "ok");
  show "escaped mutator pin" (fun () ->
      let h = Netmcore_heap.create_heap pool 4096 (ref 0) in let mm = Netmcore_heap.modify h (fun m -> m) in Netmcore_heap.pin mm [ 1 ]; "ok; debug_info after: " ^ String.escaped (Netmcore_heap.debug_info h));
  show "exception in modify, then modify" (fun () ->
      (try Netmcore_heap.modify h (fun _ -> failwith "boom") with Failure _ -> ());
      Netmcore_heap.modify h (fun _ -> "lock released"));
  show "with_value find raises, then modify" (fun () ->
      (try Netmcore_heap.with_value h (fun () -> failwith "boom") (fun x -> x) with Failure _ -> ());
      Netmcore_heap.modify h (fun _ -> "lock released"));
  show "with_value process raises: roots after" (fun () -> let h = Netmcore_heap.create_heap pool 4096 (ref [1]) in
      (try Netmcore_heap.with_value h (fun () -> !(Netmcore_heap.root h)) (fun _ -> failwith "boom") with Failure _ -> ());
      let d = Netmcore_heap.debug_info h in
      string_of_int (List.length (List.filter (fun l -> String.length l > 4 && String.sub l 0 4 = "root") (String.split_on_char '\n' d))) ^ " root lines");
  show "with_value non-heap value" (fun () -> let h = Netmcore_heap.create_heap pool 4096 (ref 0) in Netmcore_heap.with_value h (fun () -> [ 1; 2 ]) (fun l -> string_of_int (List.length l) ^ "; debug_info after: " ^ String.escaped (Netmcore_heap.debug_info h)));
  show "copy of heap value is private" (fun () ->
      let c = Netmcore_heap.copy (Netmcore_heap.root h) in sprintf "colour %s, same=%b, eq=%b" (col c) (c == Netmcore_heap.root h) (c = Netmcore_heap.root h));
  show "copy of closure" (fun () -> ignore (Netmcore_heap.copy (fun (x : int) -> x) 1); "ok");
  show "copy of int" (fun () -> string_of_int (Netmcore_heap.copy 5));
  (* pin: value not linked, but pinned, survives the internal gc triggered by filling *)
  show "pin keeps an unlinked value across internal gc" (fun () ->
      Netmcore_heap.modify h (fun m ->
          let p = Netmcore_heap.add m (String.make 64 'P') in
          Netmcore_heap.pin m p;
          let q = Netmcore_heap.add m (String.make 64 'Q') in
          for _ = 1 to 5000 do ignore (Netmcore_heap.add m (String.make 64 'z')) done;
          sprintf "pinned intact=%b unpinned intact=%b" (p = String.make 64 'P') (q = String.make 64 'Q')));
  printf "debug_info after adds:\n%s" (Netmcore_heap.debug_info h);
  printf "pool now: %s\n" (ps ());
  Netmcore_heap.gc h;
  printf "after gc: %s\n" (ps ());
  printf "root colour after gc: %s\n" (col (Netmcore_heap.root h));
  let d = Netmcore_heap.descr_of_heap h in
  printf "descr (as int) = %d (addr>>1? %b)\n" (Obj.magic d : int) true;
  show "heap_of_descr ok" (fun () -> let h2 = Netmcore_heap.heap_of_descr pool d in string_of_bool (h2 == h));
  show "heap_of_descr 12345" (fun () -> ignore (Netmcore_heap.heap_of_descr pool (Obj.magic 12345)); "ok");
  show "heap_of_descr descr+8" (fun () -> ignore (Netmcore_heap.heap_of_descr pool (Obj.magic ((Obj.magic d : int) + 8))); "ok");
  let pool2 = Netmcore_mempool.create_mempool (1024 * 1024) in
  show "heap_of_descr wrong pool" (fun () -> ignore (Netmcore_heap.heap_of_descr pool2 d); "ok");
  show "create_heap size 0" (fun () -> let h = Netmcore_heap.create_heap pool 0 (ref 1) in Netmcore_heap.destroy h; "ok");
  show "create_heap size -1" (fun () -> let h = Netmcore_heap.create_heap pool (-1) (ref 1) in Netmcore_heap.destroy h; "ok");
  show "create_heap closure root" (fun () -> ignore (Netmcore_heap.create_heap pool 4096 (ref (fun x -> x))); "ok");
  printf "pool after failed create: %s\n" (ps ());
  show "out of pool memory" (fun () ->
      let h3 = Netmcore_heap.create_heap pool2 4096 (ref [||]) in
      Netmcore_heap.modify h3 (fun m -> (Netmcore_heap.root h3) := Netmcore_heap.add m (Array.make 300_000 1)); "ok");
  show "destroy restores pool stats" (fun () ->
      let b = ps () in let h4 = Netmcore_heap.create_heap pool 4096 (ref [ 1 ]) in
      Netmcore_heap.modify h4 (fun m -> for _ = 1 to 3000 do (Netmcore_heap.root h4) := Netmcore_heap.add m (List.init 20 Fun.id) done);
      let mid = ps () in Netmcore_heap.destroy h4; sprintf "%b (before %s, grown %s, after %s)" (b = ps ()) b mid (ps ()));
  show "destroy twice" (fun () -> let h5 = Netmcore_heap.create_heap pool 4096 (ref 1) in Netmcore_heap.destroy h5; Netmcore_heap.destroy h5; "ok");
  (* Netmcore_ref *)
  let r = Netmcore_ref.sref pool [ 1; 2; 3 ] in
  show "sref deref_ro" (fun () -> String.concat "," (List.map string_of_int (Netmcore_ref.deref_ro r)));
  show "deref_ro colour" (fun () -> col (Netmcore_ref.deref_ro r));
  show "sref of int deref" (fun () -> string_of_int (Netmcore_ref.deref_ro (Netmcore_ref.sref pool 5)));
  show "sref heap root is a ref?" (fun () -> let hr = Netmcore_ref.heap r in let o = Netmcore_heap.root hr in sprintf "tag %d size %d" (Obj.tag o) (Obj.size o));
  show "sref closure" (fun () -> ignore (Netmcore_ref.sref pool (fun x -> x)); "ok");
  show "assign closure" (fun () -> Netmcore_ref.assign r (Obj.magic (fun x -> x)); "ok");
  show "old value after assign (deref_ro kept)" (fun () ->
      let old = Netmcore_ref.deref_ro r in Netmcore_ref.assign r [ 4 ]; Netmcore_heap.gc (Netmcore_ref.heap r);
      sprintf "old reads %s" (String.concat "," (List.map string_of_int old)));
  show "deref_p" (fun () -> Netmcore_ref.deref_p r (fun l -> string_of_int (List.hd l)));
  show "deref_c private" (fun () -> let c = Netmcore_ref.deref_c r in sprintf "colour %s" (col c));
  show "sref_of_descr roundtrip" (fun () -> let r2 = Netmcore_ref.sref_of_descr pool (Netmcore_ref.descr_of_sref r) in string_of_int (List.hd (Netmcore_ref.deref_ro r2)));
  show "sref_of_descr bad" (fun () -> ignore (Netmcore_ref.sref_of_descr pool (Obj.magic 4242)); "ok");
  (* hangs *)
  in_child "modify inside modify" 2 (fun () -> let h = Netmcore_heap.create_heap pool 4096 (ref 0) in Netmcore_heap.modify h (fun _ -> Netmcore_heap.modify h (fun _ -> ())); print_endline "nested modify ok");
  in_child "gc inside modify" 2 (fun () -> let h = Netmcore_heap.create_heap pool 4096 (ref 0) in Netmcore_heap.modify h (fun _ -> Netmcore_heap.gc h); print_endline "gc inside modify ok");
  in_child "modify inside with_value process" 2 (fun () -> let h = Netmcore_heap.create_heap pool 4096 (ref 0) in Netmcore_heap.with_value h (fun () -> ()) (fun () -> Netmcore_heap.modify h (fun _ -> ())); print_endline "modify in process ok");
  in_child "child killed in modify, then modify" 2 (fun () -> let h = Netmcore_heap.create_heap pool 4096 (ref 0) in
      (match Unix.fork () with 0 -> Netmcore_heap.modify h (fun _ -> Unix.kill (Unix.getpid ()) Sys.sigkill) | p -> ignore (Unix.waitpid [] p));
      Netmcore_heap.modify h (fun _ -> print_endline "modify after a killed holder ok"));
  in_child "root after destroy" 2 (fun () -> let h6 = Netmcore_heap.create_heap pool 4096 (ref [ 1 ]) in Netmcore_heap.destroy h6;
      ignore (Netmcore_heap.modify h6 (fun _ -> ())); print_endline "modify after destroy: ok");
  Netmcore.release pool; Netmcore.release pool2
