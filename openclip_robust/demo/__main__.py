from openclip_robust.demo.samples import main

main()
