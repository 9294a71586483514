(* Driver: oob.exe (white|black) (reg|noreg) (gc|sem|modify)
   gc:     shm values referenced from private data survive Gc.full_major /
           Gc.compact loops under allocation pressure?
   sem:    compare / hash / Marshal on shm values
   modify: what caml_modify does with a shm field and a young value *)
external init : int -> bool -> unit = "oob_init"
external block : int -> Obj.t array = "oob_block"
external sstring : string -> string = "oob_string"
external raw_set : Obj.t array -> int -> Obj.t -> unit = "oob_raw_set"
external check_headers : unit -> int = "oob_check_headers"
external classify : Obj.t -> int = "oob_classify"
external in_region : Obj.t -> bool = "oob_in_region"
external ref_table_len : unit -> int = "oob_ref_table_len"

let colour = match Sys.argv.(1) with "white" -> 0 | "black" -> 3 | _ -> assert false
let reg = Sys.argv.(2) = "reg"
let () = init colour reg

(* a shm cell: [| Int i; String (shm); next cell or () |] *)
let cell i next =
  let b = block 3 in
  raw_set b 0 (Obj.repr i);
  raw_set b 1 (Obj.repr (sstring (Printf.sprintf "value-%06d" i)));
  raw_set b 2 next;
  b

type holder = { mutable shm : Obj.t array; id : int; pad : int list }

let gc_test () =
  let n = 3000 in
  (* chains of 3 cells, the head referenced from a private record *)
  let holders =
    Array.init n (fun i ->
        let c = cell (3 * i + 2) (Obj.repr ()) in
        let c = cell (3 * i + 1) (Obj.repr c) in
        let c = cell (3 * i) (Obj.repr c) in
        { shm = c; id = i; pad = List.init (i mod 7) (fun k -> k) })
  in
  let tbl = Hashtbl.create 16 in
  Array.iter (fun h -> Hashtbl.replace tbl h.id h.shm) holders;
  let verify round =
    Array.iteri
      (fun i h ->
        let c = ref h.shm in
        for k = 0 to 2 do
          let a = !c in
          if not (in_region (Obj.repr a)) then
            failwith (Printf.sprintf "round %d: holder %d cell %d moved out of shm" round i k);
          if (Obj.obj a.(0) : int) <> 3 * i + k then
            failwith (Printf.sprintf "round %d: holder %d cell %d int corrupted" round i k);
          if (Obj.obj a.(1) : string) <> Printf.sprintf "value-%06d" (3 * i + k) then
            failwith (Printf.sprintf "round %d: holder %d cell %d string corrupted" round i k);
          if k < 2 then c := Obj.obj a.(2)
        done;
        if Hashtbl.find tbl i != h.shm then failwith "hashtbl entry changed")
      holders;
    let bad = check_headers () in
    if bad > 0 then failwith (Printf.sprintf "round %d: shm headers overwritten" round)
  in
  let keep = ref [] in
  for round = 1 to 60 do
    (* allocation pressure and fragmentation: keep every 3rd chunk *)
    for j = 1 to 3000 do
      let x = Array.make (1 + (j mod 50)) j in
      if j mod 3 = 0 then keep := x :: !keep
    done;
    if List.length !keep > 20000 then keep := [];
    (* shuffle which private records point where, so the holders move *)
    let i = round mod n in
    holders.(i) <- { (holders.(i)) with pad = [ round ] };
    if round mod 2 = 0 then Gc.compact () else Gc.full_major ();
    verify round
  done;
  let st = Gc.quick_stat () in
  Printf.printf "gc: survived 60 rounds, %d compactions, %d major collections\n%!"
    st.compactions st.major_collections

let sem_test () =
  let c = cell 7 (Obj.repr ()) in
  let shm_v : int * string * unit = Obj.magic c in
  let priv_v = (7, "value-000007", ()) in
  Printf.printf "classify shm value: %d (0 none, 4 static data)\n%!" (classify (Obj.repr c));
  Printf.printf "compare shm private = %d (0 means structural)\n%!" (compare shm_v priv_v);
  Printf.printf "shm = private: %b\n%!" (shm_v = priv_v);
  Printf.printf "hash equal: %b\n%!" (Hashtbl.hash shm_v = Hashtbl.hash priv_v);
  (match Marshal.to_string shm_v [] with
   | s -> Printf.printf "Marshal: ok, round trip equal: %b\n%!" (Marshal.from_string s 0 = priv_v)
   | exception e -> Printf.printf "Marshal: %s\n%!" (Printexc.to_string e));
  (match Obj.dup (Obj.repr c) with
   | d -> Printf.printf "Obj.dup: ok, in shm: %b\n%!" (in_region d)
   | exception e -> Printf.printf "Obj.dup: %s\n%!" (Printexc.to_string e))

type r = { mutable f : int list }

let modify_test () =
  let b = block 1 in
  let shm_r : r = Obj.magic b in
  let before = ref_table_len () in
  shm_r.f <- [ Random.int 10; 2; 3 ];  (* caml_modify, young value *)
  Printf.printf "ref table grew by %d after storing a young value into shm\n%!"
    (ref_table_len () - before);
  Printf.printf "field in minor heap before Gc.minor: young=%b\n%!" (classify (Obj.repr shm_r.f) = 2);
  Gc.minor ();
  let f = Obj.repr shm_r.f in
  Printf.printf "after Gc.minor the shm field points into: %s\n%!"
    (match classify f with 1 -> "private major heap (promoted, written into shm)" | 2 -> "minor heap" | 4 -> "static/shm" | _ -> "unknown");
  Gc.full_major ();
  (* the private GC never saw the shm field: the list it points to is garbage *)
  ignore (Array.init 100_000 (fun i -> [ i ]));
  Gc.full_major ();
  let ok = try shm_r.f = [ List.hd shm_r.f; 2; 3 ] with _ -> false in
  Printf.printf "after Gc.full_major + allocation the shm field still reads [_;2;3]: %b\n%!" ok

let () =
  match Sys.argv.(3) with
  | "gc" -> gc_test ()
  | "sem" -> sem_test ()
  | "modify" -> modify_test ()
  | _ -> assert false
