set terminal pngcairo size 1100,620 font 'sans,10'
set grid
set key outside right top vertical Left reverse box opaque
set style line 1 lc rgb '#0072B2' lw 2 dt 1 pt 7 ps 1.2
set style line 2 lc rgb '#D55E00' lw 2 dt 1 pt 5 ps 1.2
set style line 3 lc rgb '#009E73' lw 2 dt 1 pt 9 ps 1.2
set style line 4 lc rgb '#CC79A7' lw 2 dt 1 pt 11 ps 1.2
set style line 5 lc rgb '#E69F00' lw 2 dt 1 pt 13 ps 1.2
set style line 6 lc rgb '#56B4E9' lw 2 dt 1 pt 4 ps 1.2
set style line 7 lc rgb '#000000' lw 2 dt 1 pt 6 ps 1.2
set style line 8 lc rgb '#F0E442' lw 2 dt 1 pt 8 ps 1.2
set style line 9 lc rgb '#7F7F7F' lw 2 dt 1 pt 10 ps 1.2
set style line 10 lc rgb '#8C564B' lw 2 dt 1 pt 12 ps 1.2
set style line 11 lc rgb '#0072B2' lw 2 dt 2 pt 1 ps 1.2
set style line 12 lc rgb '#D55E00' lw 2 dt 2 pt 2 ps 1.2
set style line 13 lc rgb '#009E73' lw 2 dt 2 pt 3 ps 1.2
set style line 14 lc rgb '#CC79A7' lw 2 dt 2 pt 14 ps 1.2
set style line 15 lc rgb '#E69F00' lw 2 dt 2 pt 15 ps 1.2
set style line 16 lc rgb '#56B4E9' lw 2 dt 2 pt 65 ps 1.2
set style line 17 lc rgb '#000000' lw 2 dt 2 pt 66 ps 1.2
set style line 18 lc rgb '#F0E442' lw 2 dt 2 pt 67 ps 1.2
set style line 19 lc rgb '#7F7F7F' lw 2 dt 2 pt 68 ps 1.2
set style line 20 lc rgb '#8C564B' lw 2 dt 2 pt 69 ps 1.2
set termoption noenhanced
set output 'serve_tokens_per_second.png'
set logscale x 2
set logscale y 10
set title 'ultramem bench serve: generated tokens/s vs concurrent streams (solid: served over HTTP; dashed: the decode step alone at that batch)'
set xlabel 'concurrent streams (decode batch)'
set ylabel 'tokens/s'
$d0 << EOD
1 1034.66 1200.52
4 2859.67 4513.26
16 3716.41 6362.15
64 3226.29 7577.79
EOD
$d1 << EOD
1 639.616 692.115
4 955.117 1274.25
16 2365.81 2830.02
64 3302.42 6098.07
EOD
$d2 << EOD
1 817.912 640.03
4 2150.24 3290.41
16 2445.56 4439.38
64 2765.16 5628.97
EOD
plot $d0 using 1:2 with linespoints linestyle 1 title 'dense served', $d0 using 1:3 with linespoints linestyle 1 dashtype 2 title 'dense decode step', $d1 using 1:2 with linespoints linestyle 2 title 'moe served', $d1 using 1:3 with linespoints linestyle 2 dashtype 2 title 'moe decode step', $d2 using 1:2 with linespoints linestyle 3 title 'ultramem served', $d2 using 1:3 with linespoints linestyle 3 dashtype 2 title 'ultramem decode step'
